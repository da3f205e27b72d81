"""Curves where practitioners look: --report-to tensorboard streams every number of log.jsonl,
with the method, seed, stage and task in the tag, and the accuracies after each stage; read
back from the event file. A backend whose package is missing is one clear error, exit code 2."""
import json

import pytest

import run_sequence
from conftest import tiny_argv


def test_tensorboard_holds_the_logs_numbers_and_the_stage_accuracies(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    results = run_sequence.main(tiny_argv(steps="2", tasks="math,code") + [
        "--out", str(tmp_path), "--report-to", "tensorboard"])
    folder = tmp_path / "quick"
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 4                                      # two stages of two batches
    for line in lines:
        tag = f"grpo/seed0/stage{line['stage']}-{line['task']}/reward"
        batch = 2 * (line["stage"] - 1) + line["step"] + 1
        found = {e.step: e.value for e in events.Scalars(tag)}
        assert found[batch] == pytest.approx(line["reward"], rel=1e-6)
    R = results["runs"]["grpo"]["0"]["R"]
    for k, batch in enumerate((0, 2, 4)):                       # the base, then each stage end
        for j, task in enumerate(results["tasks"]):
            accuracy = {e.step: e.value for e in events.Scalars(f"grpo/seed0/accuracy/{task}")}
            assert accuracy[batch] == pytest.approx(R[k][j], rel=1e-6)
    assert {"grpo/seed0/stage1-math/loss", "grpo/seed0/stage2-code/grad_norm"} <= tags


def test_a_backend_that_is_not_installed_is_refused_before_the_run(tmp_path, capsys,
                                                                    monkeypatch):
    from harness import tracking
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(tiny_argv() + ["--out", str(tmp_path), "--report-to", "wandb"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--report-to wandb needs the wandb package" in err
    assert "pip install wandb" in err and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        run_sequence.main(tiny_argv() + ["--out", str(tmp_path), "--report-to", "mlflow"])
    assert "allowed are tensorboard, wandb" in capsys.readouterr().err
