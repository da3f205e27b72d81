"""The verl bridge: --print-verl maps every setting of every method and stage to the official
verl keys, and --export-verl-data writes each task's splits as the parquet files verl reads."""
import dataclasses

import pytest

import run_sequence
import sdpo_cl as s
from conftest import MCQ_ROWS
from harness import verl as bridge


def parse_verl(text) -> dict:
    """--print-verl's output as {method: {stage: {key: value}}} (plus "config" and "notes")."""
    out, method, stage = {}, None, None
    for line in text.splitlines():
        line = line.strip().rstrip("\\").strip()
        if line.startswith("# note:"):
            out[method].setdefault("notes", []).append(line[len("# note: "):])
        elif line.startswith("# stage"):
            stage = int(line.split()[2].rstrip(":"))
            out[method][stage] = {}
        elif line.startswith("# "):
            method, stage = line[2:], None
            out[method] = {}
        elif line.startswith("python -m verl.trainer.main_ppo"):
            out[method][stage]["config"] = line.split("--config-name ")[1]
        elif "=" in line and stage is not None:
            key, value = line.split("=", 1)
            out[method][stage][key] = value
    return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, random_lab):
    """A model saved with save_pretrained: what verl's model.path can load (offline here)."""
    folder = tmp_path_factory.mktemp("verl") / "model"
    random_lab[0].save_pretrained(folder)
    random_lab[1].save_pretrained(folder)
    return str(folder)


def test_print_verl_maps_settings_to_official_keys(capsys, official_task, tmp_path, model_folder):
    run_sequence.main(["--print-verl", "--model", model_folder, "--methods",
                       "grpo,sdpo_frozen,sdpo_frozen_base,stable_sdpo", "--tasks",
                       f"{official_task},math",
                       "--steps", "50,20", "--set", "alpha=1.0", "distillation_topk=20",
                       "--export-verl-data", str(tmp_path / "verl")])
    verl = parse_verl(capsys.readouterr().out)
    grpo, frozen = verl["grpo"], verl["sdpo_frozen"]
    assert grpo[1]["config"] == "baseline_grpo" and frozen[1]["config"] == "sdpo"
    ppo = "actor_rollout_ref.actor."
    sd = ppo + "self_distillation."
    expected = {"actor_rollout_ref.model.path": model_folder, "data.train_batch_size": "32",
                "actor_rollout_ref.rollout.n": "8", ppo + "ppo_mini_batch_size": "8",
                ppo + "optim.lr": "1e-05", ppo + "policy_loss.loss_mode": "vanilla",
                "algorithm.norm_adv_by_std_in_grpo": "false", ppo + "clip_ratio_high": "0.28",
                ppo + "loss_agg_mode": "token-mean", ppo + "ppo_micro_batch_size_per_gpu": "1",
                "data.apply_chat_template_kwargs.enable_thinking": "false",
                "actor_rollout_ref.rollout.val_kwargs.temperature": "0.6",
                "actor_rollout_ref.rollout.val_kwargs.n": "16",
                "trainer.total_training_steps": "50", "data.max_response_length": "8192",
                "data.train_files": str(tmp_path / "verl" / "letters" / "train.parquet")}
    assert {k: grpo[1][k] for k in expected} == expected
    assert not any(k.startswith(sd) for k in grpo[1])
    assert grpo[2]["actor_rollout_ref.model.path"] == "<checkpoint of stage 1>"
    assert grpo[2]["trainer.total_training_steps"] == "20"
    assert frozen[1][ppo + "ppo_mini_batch_size"] == "32"
    assert frozen[1][sd + "alpha"] == "1.0" and frozen[1][sd + "distillation_topk"] == "20"
    assert frozen[1][sd + "teacher_update_rate"] == "0.0"
    assert "+" + sd + "teacher_path" not in frozen[1]                 # stage 1: the base itself
    assert "+" + sd + "teacher_path" not in frozen[2]    # later: the stage's start, as verl does
    base = verl["sdpo_frozen_base"]
    assert base[2]["+" + sd + "teacher_path"] == model_folder          # later: still the base
    assert "notes" not in base                  # verl's teacher_path carries the frozen base
    assert any("teacher_update_every=10 has no verl key" in n for n in verl["stable_sdpo"]["notes"])
    assert "+" + sd + "mask_ratio" not in frozen[1] and sd + "mask_ratio" not in frozen[1]


def test_exported_verl_data_round_trips(official_task, tmp_path):
    from datasets import load_dataset
    run_sequence.main(["--export-verl-data", str(tmp_path), "--tasks", str(official_task),
                       "--probes", ""])
    rows = load_dataset("parquet", data_files=str(tmp_path / "letters" / "train.parquet"),
                        split="train")
    assert len(rows) == len(MCQ_ROWS)
    first = rows[0]
    assert first["prompt"] == [{"role": "system", "content": MCQ_ROWS[0]["system"]},
                               {"role": "user", "content": MCQ_ROWS[0]["prompt"]}]
    assert first["data_source"] == "mcq" and first["ability"] == "mcq"
    assert first["reward_model"] == {"style": "mcq", "ground_truth": "A"}
    assert first["extra_info"]["split"] == "train" and first["extra_info"]["index"] == "0"


@pytest.mark.parametrize("method", sorted(run_sequence.METHODS))
def test_every_method_is_printed_with_a_note_for_each_gap_or_refused(method, model_folder,
                                                                     capsys):
    """Each setting a method changes from the default is either a verl key of the command, or
    named: in a note above the command, or in the one refusal (a method verl cannot run as this
    code does, whose command would run another method), with exit code 2 and nothing printed."""
    cfg = run_sequence.method_config(method, {"prompts_per_step": 32}, {}, s.Config)
    changed = {f.name for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(s.Config(), f.name)}
    argv = ["--print-verl", "--model", model_folder, "--methods", method, "--tasks", "math",
            "--probes", ""]
    refusals, notes = bridge.gaps(cfg)
    if refusals:
        with pytest.raises(SystemExit) as stop:
            run_sequence.main(argv)
        out, err = capsys.readouterr()
        assert stop.value.code == 2 and out == "" and f"{method}: " in err
        said = err
    else:
        run_sequence.main(argv)
        said = "\n".join(line for line in capsys.readouterr().out.splitlines()
                         if line.startswith("# note:"))
        assert len(notes) == said.count("# note:")
    if cfg.teacher_update_rate == 0:          # a teacher frozen at the base: verl's teacher_path
        changed.discard("reset_teacher_each_task")
    assert {name for name in changed - bridge.MAPPED if f"{name}=" not in said} == set()


@pytest.mark.parametrize("model, said", [
    ("lab", "verl cannot load a lab"), ("lab-short", "verl cannot load a lab"),
    ("some/model-that-is-not-cached", "no such model on the hub or in the local cache"),
    ("weights.gguf", "not a GGUF file")])
def test_print_verl_refuses_a_model_verl_cannot_load(model, said, capsys, monkeypatch):
    import huggingface_hub.constants                 # the local cache only: no minute of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(["--print-verl", "--model", model, "--tasks", "math", "--probes", ""])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == "" and said in err and err.count("error:") == 1
