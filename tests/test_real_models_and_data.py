"""The real-model and real-data paths, offline: a tiny Llama with a real tokenizer saved to a
folder and loaded by path, tasks in the official SDPO layout, GSM8K's schema, the verl bridge."""
import copy
import json

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import data
from harness import lab

MCQ_ROWS = [{"prompt": f"Which letter is {c}? A) a B) b C) c D) d", "answer": c.upper(),
             "system": "Answer with <answer>X</answer>.", "kind": "mcq"} for c in "abcd"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def official_task(tmp_path):
    folder = tmp_path / "letters"
    folder.mkdir()
    write_jsonl(folder / "train.json", MCQ_ROWS)
    write_jsonl(folder / "test.json", MCQ_ROWS[:2])
    return folder


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


def test_official_layout_loads_rows_system_and_kind(official_task):
    task = run_sequence.load_task(str(official_task))
    assert task.name == "letters" and len(task.train) == 4 and len(task.test) == 2
    assert task.test[0]["system"].startswith("Answer with") and task.test[0]["kind"] == "mcq"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "answer": "a"}\n{not json}\n', "train.json, line 2: not valid JSON"),
    ('{"prompt": "q"}\n', "train.json, line 1: field 'answer' must be a non-empty string"),
    ('{"prompt": "", "answer": "a"}\n', "line 1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "q", "answer": "a", "system": 3}\n', "line 1: field 'system' must be a string"),
    ('["q", "a"]\n', "line 1: expected a JSON object"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    (tmp_path / "train.json").write_text(line)
    write_jsonl(tmp_path / "test.json", MCQ_ROWS)
    with pytest.raises(ValueError, match=message):
        data.load_official_task(tmp_path)


def test_missing_split_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.json", MCQ_ROWS)
    with pytest.raises(ValueError, match="has no test.json"):
        data.load_official_task(tmp_path)


def test_gsm8k_rows_get_the_official_math_prompt_and_reward(tmp_path):
    from datasets import load_dataset
    rows = [{"question": "Tom has 3 apples and buys 4. How many? ",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A farm sells 1,200 eggs twice. How many?",
             "answer": "1,200 * 2 = 2,400\n#### 2,400"}]
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    hub = load_dataset("json", data_files={k: str(tmp_path / f"{k}.jsonl")
                                           for k in ("train", "test")})
    task = data.gsm8k_task(hub)
    ex = task.test[1]
    assert ex["prompt"] == rows[1]["question"] + data.MATH_PROMPT_SUFFIX
    assert ex["answer"] == "2400" and ex["kind"] == "math"
    assert task.reward("2 * 1200 = 2400, so \\boxed{2400}", ex) == 1.0
    assert task.reward("The answer is 2400", ex) == 0.0          # the official reward wants a box
    assert task.reward("\\boxed{2300}", ex) == 0.0
    assert "\\boxed{your_answer}" in task.feedback("It is 2300.", ex)
    assert task.feedback("\\boxed{2400}", ex) is None


def test_a_tokenizer_without_chat_template_gets_the_plain_fallback(model_folder):
    _, tok = run_sequence.load_policy(str(model_folder))
    assert s.format_prompt(tok, "2+2?", "Be brief.") == "Be brief.\n\nUser: 2+2?\nAssistant:"


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        run_sequence.load_policy(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        run_sequence.load_policy(str(tmp_path / "model.gguf"))


def test_model_by_path_runs_both_losses_with_distillation(model_folder, official_task):
    model, tok = run_sequence.load_policy(str(model_folder))
    task = run_sequence.load_task(str(official_task))
    task.reward = lambda c, ex: float(len(c) % 2 == 0)       # mixed rewards from a random model
    for mode in ("grpo", "sdpo"):
        cfg = s.Config(loss_mode=mode, prompts_per_step=2, group_size=4, max_new_tokens=8)
        m = copy.deepcopy(model)
        teacher = s.Teacher(m, cfg) if mode == "sdpo" else None
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        torch.manual_seed(0)
        metrics = s.train_step(m, tok, teacher, opt, sched, task, [task.train[0],
                                                                   task.train[1]], cfg)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        if mode == "sdpo":
            assert metrics["distill_frac"] > 0 and metrics["t_teacher"] > 0


def test_run_sequence_with_model_path_and_official_task(model_folder, official_task, tmp_path):
    results = run_sequence.main([
        "--model", str(model_folder), "--tasks", str(official_task), "--probes", "",
        "--methods", "grpo,sdpo", "--steps", "1", "--out", str(tmp_path), "--name", "real",
        "--set", "prompts_per_step=4", "group_size=2", "max_new_tokens=6", "eval_examples=2",
        "--device", "cpu"])
    assert results["tasks"] == ["letters"]
    for method in ("grpo", "sdpo"):
        assert len(results["runs"][method]["0"]["R"]) == 2
    assert (tmp_path / "real" / "sdpo" / "seed0" / "stage1" / "teacher").is_dir()


def test_run_sequence_refuses_an_unloadable_model_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_sequence.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "quick").exists()


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


def test_print_verl_maps_settings_to_official_keys(capsys, official_task, tmp_path):
    run_sequence.main(["--print-verl", "--model", "Qwen/Qwen3-0.6B", "--methods",
                       "grpo,sdpo_frozen,hybrid", "--tasks", f"{official_task},math",
                       "--steps", "50,20", "--set", "alpha=1.0", "distillation_topk=20",
                       "--export-verl-data", str(tmp_path / "verl")])
    verl = parse_verl(capsys.readouterr().out)
    grpo, frozen = verl["grpo"], verl["sdpo_frozen"]
    assert grpo[1]["config"] == "baseline_grpo" and frozen[1]["config"] == "sdpo"
    ppo = "actor_rollout_ref.actor."
    sd = ppo + "self_distillation."
    expected = {"actor_rollout_ref.model.path": "Qwen/Qwen3-0.6B", "data.train_batch_size": "32",
                "actor_rollout_ref.rollout.n": "8", ppo + "ppo_mini_batch_size": "8",
                ppo + "optim.lr": "1e-05", ppo + "policy_loss.loss_mode": "vanilla",
                "algorithm.norm_adv_by_std_in_grpo": "false", ppo + "clip_ratio_high": "0.28",
                ppo + "loss_agg_mode": "token-mean", ppo + "ppo_micro_batch_size_per_gpu": "1",
                "data.apply_chat_template_kwargs.enable_thinking": "false",
                "actor_rollout_ref.rollout.val_kwargs.temperature": "0.6",
                "actor_rollout_ref.rollout.val_kwargs.n": "4",
                "trainer.total_training_steps": "50",
                "data.train_files": str(tmp_path / "verl" / "letters" / "train.parquet")}
    assert {k: grpo[1][k] for k in expected} == expected
    assert not any(k.startswith(sd) for k in grpo[1])
    assert grpo[2]["actor_rollout_ref.model.path"] == "<checkpoint of stage 1>"
    assert grpo[2]["trainer.total_training_steps"] == "20"
    assert frozen[1][ppo + "ppo_mini_batch_size"] == "32"
    assert frozen[1][sd + "alpha"] == "1.0" and frozen[1][sd + "distillation_topk"] == "20"
    assert frozen[1][sd + "teacher_update_rate"] == "0.0"
    assert "+" + sd + "teacher_path" not in frozen[1]                 # stage 1: the base itself
    assert frozen[2]["+" + sd + "teacher_path"] == "Qwen/Qwen3-0.6B"   # later: still the base
    assert any("no verl key" in n for n in verl["hybrid"]["notes"])
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
