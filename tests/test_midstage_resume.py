"""Resume inside a stage: a run killed with SIGKILL midway through a stage, after a mid-stage
checkpoint (every --checkpoint-every rollout batches, one at a time, written whole then swapped
in), and started again gives the records and the log of a run that was never stopped, on CPU:
for full fine-tuning (GRPO) and for a LoRA adapter with SDPO's EMA teacher (a second adapter).
The uninterrupted run and the killed one are processes of their own, side by side, forked from
the test's (whose torch is already loaded); the restart runs in the test's process, which has
run neither (what it resumes from can only be on disk). Each runs on one thread, the same
arithmetic order."""
import json
import multiprocessing
import os
import signal
import sys
import time

import pytest

import run_sequence

FORK = multiprocessing.get_context("fork")


def argv(out, method, sets):
    return ["--model", "lab-short", "--tasks", "math", "--probes", "", "--steps", "6",
            "--methods", method, "--seeds", "0", "--checkpoint-every", "2",
            "--skip-signal-check", "--out", str(out), "--name", "r",
            "--set", "prompts_per_step=4", "eval_examples=4", *sets]


def quiet_run(args):
    sys.stdout = open(os.devnull, "w")
    run_sequence.main(args)


def start(out, method, sets):
    proc = FORK.Process(target=quiet_run, args=(argv(out, method, sets),))
    proc.start()
    return proc


def run(out, method, sets, kill_at_midstage=False, proc=None):
    proc = proc or start(out, method, sets)
    if kill_at_midstage:
        checkpoint = out / "r" / method / "seed0" / "midstage" / "loop.pt"
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()                                                       # SIGKILL
        proc.join()
        return proc.exitcode
    proc.join(timeout=300)
    assert proc.exitcode == 0
    return 0


def without_times(value):
    """A record or log line without what no two runs share: wall times."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items()
                if not (k.startswith("seconds") or k.startswith("t_"))}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


@pytest.mark.parametrize("method, sets", [("grpo", []), ("sdpo", ["lora_rank=4"])],
                         ids=["full fine-tuning", "LoRA"])
def test_a_run_killed_inside_a_stage_resumes_to_the_uninterrupted_records(tmp_path, method,
                                                                         sets):
    whole = start(tmp_path / "whole", method, sets)       # beside the one to be cut: each on
    code = run(tmp_path / "cut", method, sets, kill_at_midstage=True)   # one thread of its own
    run(tmp_path / "whole", method, sets, proc=whole)
    sub = tmp_path / "cut" / "r" / method / "seed0"
    assert code == -signal.SIGKILL
    assert (sub / "midstage" / "loop.pt").exists() and not (sub / "stage1").exists()
    assert not (sub / "midstage.tmp").exists() or (sub / "midstage").exists()
    run_sequence.main(argv(tmp_path / "cut", method, sets))   # the same command, again
    assert not (sub / "midstage").exists()                   # a finished stage needs none
    whole, cut = (json.loads((tmp_path / name / "r" / "results.json").read_text())
                  for name in ("whole", "cut"))
    assert without_times(cut["runs"]) == without_times(whole["runs"])
    logs = [[without_times(json.loads(line)) for line in
             (tmp_path / name / "r" / "log.jsonl").read_text().splitlines()]
            for name in ("whole", "cut")]
    assert logs[1] == logs[0] and [line["step"] for line in logs[0]] == list(range(6))
