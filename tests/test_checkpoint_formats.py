"""The per-stage checkpoints load with the two lines docs/real-models.md gives: a full model as
any transformers model folder (from_pretrained), a LoRA policy as a peft adapter on its base;
each loaded model computes what the run's policy computed at the end of that stage."""
import copy

import pytest
import torch

import run_sequence
from harness import lab
from conftest import alternating_reward


def logits(model, tok):
    ids = tok("<|user|>1+2=<|assistant|>", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def test_a_full_fine_tuning_stage_loads_with_from_pretrained(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, _, _ = smoke_run
    stage = folder / "grpo" / "seed0" / "stage2" / "policy"
    model = AutoModelForCausalLM.from_pretrained(stage)            # the two lines
    tok = AutoTokenizer.from_pretrained(stage)
    assert tok.decode(tok("3+4=7").input_ids) == "3+4=7"
    assert logits(model, tok).shape[-1] == len(tok)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")   # peft 0.21's
def test_a_lora_stage_loads_as_a_peft_adapter_on_its_base(tmp_path, short_lab):   # own call
    from peft import PeftModel
    base, tok = short_lab
    cfg = lab.lab_config("lab-short", loss_mode="grpo", prompts_per_step=4, steps_per_task=2,
                         eval_examples=4, lora_rank=4, lr=1e-2)
    task = lab.make_lab_task("math", "lab-short", n_test=4)
    task.reward = alternating_reward()
    policy = copy.deepcopy(base)
    run_sequence.run_in_folder(cfg, policy, tok, [task], [], tmp_path / "run")
    trained = run_sequence.lora.add_lora(copy.deepcopy(base), cfg)     # the run's policy, again
    run_sequence.runs.load_weights(trained, tmp_path / "run" / "stage1" / "policy")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "run" / "stage1" /
                                       "policy")                       # the two lines
    assert torch.allclose(logits(loaded, tok), logits(trained, tok), atol=1e-5)
    assert not torch.allclose(logits(loaded, tok), logits(base, tok), atol=1e-5)
