"""A real model by path, offline: a tiny Llama with a real tokenizer (no chat template, pad ==
eos, as many base models) saved to a folder and loaded by path trains with both losses, and
run_sequence.py runs it on a task in the official layout with the same numbers an evaluation of
the base model gives; a model that cannot be loaded is one clear error before anything runs."""
import copy
import json

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab
from conftest import alternating_reward, coin_reward, flat_params


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A 'hub-like' model on disk: no chat template, pad == eos (as in many base models)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = lab.build_lab_tokenizer()
    tok.chat_template = None
    tok.pad_token = tok.eos_token
    lab.build_lab_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_tokenizer_without_chat_template_gets_the_plain_fallback(model_folder):
    _, tok = run_sequence.load_policy(str(model_folder))
    assert s.format_prompt(tok, "2+2?", "Be brief.") == "Be brief.\n\nUser: 2+2?\nAssistant:"


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        run_sequence.load_policy(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        run_sequence.load_policy(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize("mode", ["grpo", "sdpo"])
def test_a_model_by_path_trains_with_either_loss(model_folder, official_task, mode):
    model, tok = run_sequence.load_policy(str(model_folder))
    task = run_sequence.load_task(str(official_task))
    task.reward = alternating_reward()                # half of every group solved
    cfg = s.Config(loss_mode=mode, prompts_per_step=2, group_size=4, max_new_tokens=8)
    m = copy.deepcopy(model)
    teacher = s.Teacher(m, cfg) if mode == "sdpo" else None
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(0)
    metrics = s.train_step(m, tok, teacher, opt, sched, task, [task.train[0], task.train[1]],
                           cfg)
    assert metrics["reward"] == 0.5 and (flat_params(m) - flat_params(model)).abs().max() > 0
    if mode == "sdpo":
        assert metrics["distill_frac"] == 1.0 and metrics["t_teacher"] > 0


def test_run_sequence_with_a_model_path_and_an_official_task(model_folder, official_task,
                                                            tmp_path, monkeypatch):
    """Scored by coin_reward (a random model never answers right), so the stage trains and the
    accuracies are not all 0."""
    load_task = run_sequence.load_task

    def scored_by_coin(name, model="lab"):
        task = load_task(name, model)
        task.reward = coin_reward
        return task
    monkeypatch.setattr(run_sequence, "load_task", scored_by_coin)
    results = run_sequence.main([
        "--model", str(model_folder), "--tasks", str(official_task), "--probes", "",
        "--methods", "grpo,sdpo", "--steps", "1", "--out", str(tmp_path), "--name", "real",
        "--set", "prompts_per_step=4", "group_size=2", "max_new_tokens=6", "eval_examples=2",
        "warmup_steps=0", "--device", "cpu"])
    assert results["tasks"] == ["letters"]
    assert json.loads((tmp_path / "real" / "results.json").read_text())["runs"] == results["runs"]
    model, tok = run_sequence.load_policy(str(model_folder))
    cfg = s.Config(prompts_per_step=4, group_size=2, max_new_tokens=6, eval_examples=2)
    base = s.base_row(model, tok, [scored_by_coin(str(official_task))], cfg)["record"]
    for method in ("grpo", "sdpo"):
        run = results["runs"][method]["0"]
        assert run["R"][0] == [base["accuracy"]["letters"]]           # row 0: the base model
        assert run["R"][1] == [run["records"][1]["accuracy"]["letters"]]
        assert all(round(32 * row[0]) == 32 * row[0] for row in run["R"])  # 2 prompts x 16
        assert run["records"][1]["param_drift"]["overall"] > 0          # the stage trained
    assert (tmp_path / "real" / "sdpo" / "seed0" / "stage1" / "teacher").is_dir()


def test_run_sequence_refuses_an_unloadable_model_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert stop.value.code == 2 and "could not be loaded" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
