"""Bad input: every case is one clear message (what is wrong, the flag, file or value, what is
allowed) with exit code 2, before any training and before anything is written."""
import json

import pytest

import eval_forgetting
import run_sequence
from conftest import tiny_argv

TINY = tiny_argv()


def rows(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


def official_task(tmp_path, train=None, test=None, name="data"):
    folder = tmp_path / name
    folder.mkdir()
    good = [{"prompt": "Which? A) x B) y", "answer": "A", "kind": "mcq"}] * 4
    rows(folder / "train.json", train or good)
    if isinstance(test, bytes):
        (folder / "test.json").write_bytes(test)
    else:
        rows(folder / "test.json", test or good)
    return str(folder)


CASES = {
    "seeds not integers": (["--seeds", "abc"], "--seeds 'abc': expected comma-separated integers"),
    "steps not integers": (["--steps", "1.5"], "--steps '1.5': expected comma-separated integers"),
    "no seeds": (["--seeds", ""], "--seeds '': give at least one"),
    "no tasks": (["--tasks", ""], "--tasks '': give at least one"),
    "unknown method": (["--methods", "grpo,ppo"], "unknown ['ppo']"),
    "unknown task": (["--tasks", "math,chess"], "unknown task 'chess'"),
    "steps per task": (["--steps", "1,2,3"], "--steps '1,2,3'"),
    "the paper's stages on two tasks": (["--steps", "paper", "--tasks", "math,code"],
                                        "--steps paper: the paper's stages are for 4 tasks"),
    "value out of range": (["--set", "alpha=2"], "Config.alpha=2 is invalid"),
    "unknown setting": (["--set", "colour=red"], "--set 'colour=red'"),
    "a bool for a number": (["--set", "lr=true"], "Config.lr=True is invalid: allowed a finite"),
    "NaN": (["--set", "lr=NaN"], "Config.lr=nan is invalid"),
    "betas": (["--set", "adam_betas=abc"], "Config.adam_betas='abc' is invalid"),
    "seed by --set": (["--set", "seed=3"], "seed is set with --seeds"),
    "steps by --set": (["--set", "steps_per_task=3"], "steps_per_task is set with --steps"),
    "an override the method fixes": (
        ["--methods", "sdpo_frozen", "--set", "teacher_update_rate=0.3"],
        "conflicts with the method 'sdpo_frozen', which fixes teacher_update_rate=0.0"),
    "a KL anchor for SFT": (["--methods", "sft", "--set", "kl_loss_coef=0.1"],
                           "Config.kl_loss_coef=0.1 is invalid: allowed 0 with loss_mode='sft'"),
    "print-verl with a typo folder": (["--print-verl", "--tasks", "/typo_folder"],
                                      "task folder '/typo_folder' does not exist"),
    "no pre-training steps": (["--lab-steps", "0"], "--lab-steps 0: give a positive number"),
    "a teacher_path that is not there": (["--set", "teacher_path=/missing/model"],
                                         "teacher_path='/missing/model' is neither a model"),
    "a negative LoRA rank": (["--set", "lora_rank=-1"],
                             "Config.lora_rank=-1 is invalid: allowed an integer >= 0"),
    "a teacher_path with LoRA": (["--set", "lora_rank=4", "teacher_path=/some/model"],
                                 "Config.teacher_path='/some/model' is invalid: allowed None with"),
    "LoRA on layers the model lacks": (["--set", "lora_rank=4", "lora_target_modules=qkv_proj"],
                                       "lora_target_modules='qkv_proj': allowed 'all-linear' or"),
    "8-bit AdamW on the CPU": (["--set", "optim_8bit=true"],
                               "optim_8bit=true: bitsandbytes' 8-bit AdamW runs on CUDA"),
}


def refused(main, argv, capsys) -> str:
    """What main(argv) says on stderr, after checking that it exits with code 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case", CASES)
def test_bad_flags_and_settings_are_refused_before_anything_is_written(tmp_path, capsys, case):
    args, message = CASES[case]
    assert message in refused(run_sequence.main, TINY + args + ["--out", str(tmp_path)], capsys)
    assert list(tmp_path.iterdir()) == []                     # nothing written


def test_two_task_folders_of_the_same_name_are_refused(tmp_path, capsys):
    for parent in ("x", "y"):
        (tmp_path / parent).mkdir()
    first, second = (official_task(tmp_path / parent, name="data") for parent in ("x", "y"))
    err = refused(run_sequence.main, tiny_argv(tasks=f"{first},{second}")
                  + ["--out", str(tmp_path / "runs")], capsys)
    assert "are both named 'data'" in err and not (tmp_path / "runs").exists()


def test_a_file_that_is_not_utf8_is_named(tmp_path, capsys):
    folder = official_task(tmp_path, test="café".encode("latin-1"))
    err = refused(run_sequence.main, tiny_argv(tasks=folder) + ["--out", str(tmp_path / "runs")],
                  capsys)
    assert "test.json: not UTF-8 text" in err and not (tmp_path / "runs").exists()


def test_a_mcq_answer_that_is_not_a_letter_is_refused(tmp_path, capsys):
    folder = official_task(tmp_path, train=[{"prompt": "6*7?", "answer": "42", "kind": "mcq"}])
    err = refused(run_sequence.main, tiny_argv(tasks=folder) + ["--out", str(tmp_path / "runs")],
                  capsys)
    assert "line 1: a mcq answer must be one capital letter" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("row, said", [
    ({"kind": "tooluse", "answer": "[]"}, "line 1: a tooluse answer needs at least one call"),
    ({"kind": "code", "answer": "-", "tests": {"inputs": [], "outputs": []}},
     "line 1: a code row has no tests: every program would pass"),
    ({"kind": "code", "answer": "-", "tests": {"inputs": "ab", "outputs": "ab"}},
     "line 1: a code row `tests.inputs` and `tests.outputs` must be lists"),
    ({"kind": "code", "answer": "-", "tests": {"inputs": ["assert apply(lambda x: x, 2) == 2"],
                                               "outputs": [""], "testtype": "code"}},
     "line 1: a code row test 1: the test code passes a lambda to apply (test code line 1")])
def test_a_row_whose_reward_cannot_vary_is_refused_with_its_line(tmp_path, capsys, row, said):
    """A row every answer passes (no gold call, no test) or whose tests are malformed (or
    cannot run apart from the program) would give a constant reward: refused at load, naming
    the file and line."""
    folder = official_task(tmp_path, train=[{"prompt": "do it", **row}])
    err = refused(run_sequence.main, tiny_argv(tasks=folder) + ["--out", str(tmp_path / "runs")],
                  capsys)
    assert said in err and "train.json" in err and not (tmp_path / "runs").exists()


CODE_ROW = {"prompt": "add", "answer": "-", "kind": "code",
            "tests": {"inputs": ["1 2\n"], "outputs": ["3\n"], "testtype": "stdin"}}


def test_a_run_with_code_where_the_sandbox_cannot_start_is_refused_before_any_work(
        tmp_path, capsys, monkeypatch):
    """One message (what failed, what to change, the opt-out and its risk) and exit code 2,
    before the base evaluation; not a RuntimeError at the first program, mid-run."""
    from harness import sandbox
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED, raising=False)
    monkeypatch.setattr(sandbox, "_isolation_reason", "user namespaces are disabled here")
    monkeypatch.setattr(run_sequence.sc, "base_row", lambda *a, **k: pytest.fail("it ran"))
    folder = official_task(tmp_path, train=[CODE_ROW] * 2, test=[CODE_ROW])
    err = refused(run_sequence.main, tiny_argv(tasks=folder) + ["--out", str(tmp_path / "runs")],
                  capsys)
    assert "cannot: user namespaces are disabled here" in err
    assert "--allow-unisolated-code" in err and "can read and write whatever" in err
    assert err.count("error:") == 1 and not (tmp_path / "runs").exists()


def test_a_prompt_longer_than_the_context_is_reported_when_the_task_loads(tmp_path, capsys):
    long = [{"prompt": "x" * 2_000, "answer": "A", "kind": "mcq"}]      # 512 positions
    folder = official_task(tmp_path, train=long + [{"prompt": "ok?", "answer": "B",
                                                     "kind": "mcq"}] * 3)
    err = refused(run_sequence.main, tiny_argv(tasks=folder) + ["--out", str(tmp_path / "runs")],
                  capsys)
    assert "1 of 4 train prompts do not fit the model's context (512 positions" in err
    assert "--long-prompts drop" in err and not (tmp_path / "runs").exists()


def test_eval_forgetting_names_a_truncated_results_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"tasks": ["a"], "trai')
    err = refused(eval_forgetting.main, [str(tmp_path)], capsys)
    assert "results.json is damaged or truncated" in err
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]       # no report written


def test_a_damaged_config_json_is_named_and_left_as_it_was(tmp_path, capsys):
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "config.json").write_text("garbage")
    err = refused(run_sequence.main, TINY + ["--out", str(tmp_path)], capsys)
    assert "has a damaged config.json" in err
    assert [p.name for p in (tmp_path / "quick").iterdir()] == ["config.json"]
    assert (tmp_path / "quick" / "config.json").read_text() == "garbage"


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(run_sequence.main, TINY + ["--out", str(tmp_path / "file")], capsys)
    assert f"--out {str(tmp_path / 'file')!r} is a file" in err


def test_a_row_nested_too_deeply_is_named(tmp_path, capsys):
    nested = "[" * 100_000 + "]" * 100_000
    deep = '{"prompt": "x", "answer": "A", "kind": "mcq", "extra": ' + nested + "}"
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.json").write_text(deep + "\n")
    (folder / "test.json").write_text(deep + "\n")
    err = refused(run_sequence.main, tiny_argv(tasks=str(folder)) + ["--out", str(tmp_path / "r")],
                  capsys)
    assert "train.json, line 1: JSON nested too deeply" in err


def test_a_null_in_an_accuracy_matrix_is_named(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"tasks": ["a"], "trained": [0], "runs": {
        "grpo": {"0": {"R": [[0.5], [None]], "records": []}}}}))
    err = refused(eval_forgetting.main, [str(tmp_path)], capsys)
    assert "grpo seed 0 has an accuracy that is not a number in [0, 1]" in err


def write_results(folder, steps, runs):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "name": folder.name, "tasks": ["a"], "trained": [0], "config": {"steps": steps},
        "runs": runs}))
    return str(folder)


def test_runs_with_other_stage_lengths_are_not_merged(tmp_path, capsys):
    first = write_results(tmp_path / "one", [5], {})
    second = write_results(tmp_path / "two", [7], {})
    err = refused(eval_forgetting.main, [first, second, "--out", str(tmp_path / "vs")], capsys)
    assert "run 'two' has steps [7], expected [5]" in err


def test_several_runs_need_their_own_out_folder(tmp_path, capsys):
    first, second = (write_results(tmp_path / n, [5], {}) for n in ("one", "two"))
    err = refused(eval_forgetting.main, [first, second], capsys)
    assert "several run folders: give --out" in err
    assert not (tmp_path / "one" / "report.md").exists()


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = refused(run_sequence.main, TINY + ["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert "--device cuda: this torch has no CUDA device" in err


def test_a_model_folder_with_a_truncated_weights_file_is_named(tmp_path, capsys, random_lab):
    model, tok = random_lab
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = refused(run_sequence.main, ["--model", str(tmp_path / "m"), "--out",
                                      str(tmp_path / "r")], capsys)
    assert f"model {str(tmp_path / 'm')!r} could not be loaded" in err
