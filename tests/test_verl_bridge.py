"""The verl bridge: --print-verl maps every setting of every method and stage to the official
verl keys, and --export-verl-data writes each task's splits as the parquet files verl reads."""
import run_sequence
from conftest import MCQ_ROWS


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
                       "grpo,sdpo_frozen,sdpo_frozen_base,hybrid", "--tasks",
                       f"{official_task},math",
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
    assert base[2]["+" + sd + "teacher_path"] == "Qwen/Qwen3-0.6B"     # later: still the base
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
