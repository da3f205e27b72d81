"""The real-model and real-data paths, offline: a tiny Llama with a real tokenizer saved to a
folder and loaded by path, tasks in the official SDPO layout, GSM8K's schema, the verl bridge."""
import copy
import json

import pytest
import torch

import run_sequence
import sdpo_cl as s

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
    tok = s.build_lab_tokenizer()
    tok.chat_template = None
    tok.pad_token = tok.eos_token
    s.build_lab_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_official_layout_loads_rows_system_and_kind(official_task):
    task = s.load_task(str(official_task))
    assert task.name == "letters" and len(task.train) == 4 and len(task.test) == 2
    assert task.test[0]["system"].startswith("Answer with") and task.test[0]["kind"] == "mcq"


def test_mcq_reward_reads_the_letter_after_the_last_answer_tag():
    ex = {"answer": "B", "kind": "mcq"}
    assert s.official_reward("maybe <answer>A</answer>, no: <answer>B</answer>", ex) == 1.0
    assert s.official_reward("<answer>B</answer> then <answer>C</answer>", ex) == 0.0
    assert s.official_reward("B", ex) == 0.0                   # the tag is required
    assert s.official_reward("<answer>B</answer>", {"answer": "<answer>B</answer>",
                                                    "kind": "mcq"}) == 1.0


def test_other_kinds_use_normalised_exact_match():
    ex = {"answer": "New  York", "kind": ""}
    assert s.official_reward("  new york ", ex) == 1.0
    assert s.official_reward("I think <answer>new york</answer>", ex) == 1.0
    assert s.official_reward("Boston", ex) == 0.0


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
        s.load_official_task(tmp_path)


def test_missing_split_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.json", MCQ_ROWS)
    with pytest.raises(ValueError, match="has no test.json"):
        s.load_official_task(tmp_path)


def test_gsm8k_parsing_reward_and_feedback(tmp_path):
    from datasets import load_dataset
    rows = [{"question": "Tom has 3 apples and buys 4. How many? ",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A farm sells 1,200 eggs twice. How many?",
             "answer": "1,200 * 2 = 2,400\n#### 2,400"}]
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    data = load_dataset("json", data_files={k: str(tmp_path / f"{k}.jsonl")
                                            for k in ("train", "test")})
    task = s.gsm8k_task(data)
    ex = task.test[1]
    assert ex["prompt"] == rows[1]["question"] and ex["answer"] == "2,400"
    assert task.reward("2 * 1200 = 2400, so the answer is 2400.", ex) == 1.0
    assert task.reward("The answer is 2,400", ex) == 1.0
    assert task.reward("2400 eggs? no, 2300", ex) == 0.0     # the last number counts
    feedback = task.feedback("It is 2300.", ex)
    assert "2300" in feedback and "2400" not in feedback and "2,400" not in feedback
    assert task.feedback("no idea", ex) == "Your answer does not end with a final number."
    assert task.feedback("2400", ex) is None


def test_a_tokenizer_without_chat_template_gets_the_plain_fallback(model_folder):
    _, tok = s.load_policy(str(model_folder))
    assert s.format_prompt(tok, "2+2?", "Be brief.") == "Be brief.\n\nUser: 2+2?\nAssistant:"


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        s.load_policy(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        s.load_policy(str(tmp_path / "model.gguf"))


def test_model_by_path_runs_both_losses_with_distillation(model_folder, official_task):
    model, tok = s.load_policy(str(model_folder))
    task = s.load_task(str(official_task))
    task.reward = lambda c, ex: float(len(c) % 2 == 0)       # mixed rewards from a random model
    for mode in ("grpo", "sdpo"):
        cfg = s.Config(model=str(model_folder), loss_mode=mode, prompts_per_step=2,
                       group_size=4, max_new_tokens=8, device="cpu")
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
        "--set", "prompts_per_step=2", "group_size=2", "max_new_tokens=6", "eval_examples=2",
        'device="cpu"'])
    assert results["tasks"] == ["letters"]
    for method in ("grpo", "sdpo"):
        assert len(results["runs"][method]["0"]["R"]) == 2
    assert (tmp_path / "real" / "sdpo" / "seed0" / "stage1" / "teacher").is_dir()


def test_run_sequence_refuses_an_unloadable_model_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_sequence.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "quick").exists()


def test_print_verl_maps_settings_to_official_keys(capsys, official_task):
    run_sequence.main(["--print-verl", "--model", "Qwen/Qwen3-0.6B", "--methods",
                       "grpo,sdpo_frozen,hybrid", "--tasks", f"{official_task},math",
                       "--steps", "50,20", "--set", "alpha=1.0", "distillation_topk=20"])
    out = capsys.readouterr().out
    grpo, sdpo, hybrid = out.split("# grpo")[1].split("# sdpo_frozen")[0], \
        out.split("# sdpo_frozen")[1].split("# hybrid")[0], out.split("# hybrid")[1]
    assert "--config-name baseline_grpo" in grpo and "loss_mode=vanilla" in grpo
    assert "self_distillation" not in grpo
    for line in ("actor_rollout_ref.model.path=Qwen/Qwen3-0.6B", "data.train_batch_size=32",
                 "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.optim.lr=1e-05",
                 "algorithm.norm_adv_by_std_in_grpo=False",
                 "actor_rollout_ref.actor.clip_ratio_high=0.28",
                 "actor_rollout_ref.actor.loss_agg_mode=token-mean",
                 "trainer.total_training_steps=50", f"data.train_files={official_task}/train.json"):
        assert line in grpo, line
    assert "model.path=<checkpoint of stage 1>" in grpo and "trainer.total_training_steps=20" in grpo
    for line in ("--config-name sdpo", "policy_loss.loss_mode=sdpo",
                 "self_distillation.alpha=1.0", "self_distillation.distillation_topk=20",
                 "self_distillation.teacher_regularization=ema",
                 "self_distillation.teacher_update_rate=0.0"):
        assert line in sdpo, line
    assert "distillation_weight=0.5" in hybrid and "no verl key" in hybrid
