"""SDPO teacher contexts (demonstrations, feedback, templates) and teacher weights."""
import pytest
import torch

from sdpo_cl import (Config, Teacher, ema_update_, strip_thinking, teacher_contexts,
                     trust_region_logits)

PROMPTS = ["Q"] * 4
COMPLETIONS = ["right-0", "wrong-1", "right-2", "wrong-3"]
REWARDS = [1.0, 0.0, 1.0, 0.0]
NO_FEEDBACK = [None] * 4


def demo_of(context):
    """The demonstration inside a teacher context, or None."""
    if context is None or "Correct solution:" not in context:
        return None
    demo = context.split("Correct solution:\n\n")[1]
    return demo.split("\nThe following is feedback")[0].split("\n\nCorrectly solve")[0]


def test_official_templates_render_exactly():
    """As the official yaml renders them (`|-` block scalars: no trailing newlines)."""
    cfg = Config(group_size=2, dont_reprompt_on_self_success=False)
    ctx = teacher_contexts(["2+2=?"], ["4"], [1.0], [None], 1, cfg)[0]
    assert ctx == "2+2=?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."


def test_demonstration_is_the_first_successful_sibling_other_than_itself():
    ctx = teacher_contexts(PROMPTS, COMPLETIONS, REWARDS, NO_FEEDBACK, 4, Config(group_size=4))
    assert [demo_of(c) for c in ctx] == ["right-2", "right-0", "right-0", "right-0"]


def test_without_dont_reprompt_a_success_may_see_itself():
    cfg = Config(group_size=4, dont_reprompt_on_self_success=False)
    ctx = teacher_contexts(PROMPTS, COMPLETIONS, REWARDS, NO_FEEDBACK, 4, cfg)
    assert demo_of(ctx[0]) == "right-0"


def test_a_lone_success_gets_no_teacher_and_groups_do_not_mix():
    completions = ["a", "b", "c", "d", "e", "f"]
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]          # two groups of 3; only the first solved
    ctx = teacher_contexts(["Q"] * 6, completions, rewards, [None] * 6, 3, Config(group_size=3))
    assert ctx[0] is None                              # its only demo would be itself
    assert [demo_of(c) for c in ctx[1:3]] == ["a", "a"]
    assert ctx[3:] == [None, None, None]               # unsolved group, no feedback: mask 0


def test_success_threshold_decides_what_counts_as_a_demonstration():
    cfg = Config(group_size=2, success_reward_threshold=0.5)
    ctx = teacher_contexts(["Q", "Q"], ["half", "zero"], [0.5, 0.0], [None, None], 2, cfg)
    assert demo_of(ctx[1]) == "half"


def test_feedback_is_used_only_without_a_solution_by_default():
    feedback = [None, "too small", None, "too large"]
    cfg = Config(group_size=2, include_environment_feedback=True)
    rewards = [1.0, 0.0, 0.0, 0.0]                     # group 1 solved, group 2 not
    ctx = teacher_contexts(PROMPTS, COMPLETIONS, rewards, feedback, 2, cfg)
    assert demo_of(ctx[1]) == "right-0" and "feedback" not in ctx[1]
    assert ctx[2] is None                              # no demo and no feedback for it
    assert ctx[3] == ("Q\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                      "too large\n\nCorrectly solve the original question.")


def test_feedback_together_with_a_solution_when_allowed():
    cfg = Config(group_size=2, include_environment_feedback=True,
                 environment_feedback_only_without_solution=False)
    ctx = teacher_contexts(PROMPTS[:2], COMPLETIONS[:2], [1.0, 0.0], [None, "too small"], 2, cfg)
    assert demo_of(ctx[1]) == "right-0" and "too small" in ctx[1]
    assert ctx[1].index("Correct solution") < ctx[1].index("feedback")


def test_feedback_is_ignored_unless_enabled():
    ctx = teacher_contexts(PROMPTS[:2], COMPLETIONS[:2], [0.0, 0.0], ["x", "y"], 2,
                           Config(group_size=2))
    assert ctx == [None, None]


def test_thinking_is_stripped_from_demonstrations():
    assert strip_thinking("<think>long\nwork</think>\nanswer 4") == "answer 4"
    # a template that opens the block in the prompt leaves an unmatched </think>
    assert strip_thinking("work on it</think>\n\nanswer 4") == "answer 4"
    ctx = teacher_contexts(["Q", "Q"], ["<think>hmm</think> 4", "5"], [1.0, 0.0], [None] * 2, 2,
                           Config(group_size=2))
    assert demo_of(ctx[1]) == "4"


def tiny_linear(value):
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(layer.weight, value)
    return layer


def test_ema_update_formula():
    teacher, student = tiny_linear(0.0), tiny_linear(1.0)
    ema_update_(teacher, student, 0.05)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.05))
    ema_update_(teacher, student, 0.05)               # 0.05 + 0.05 * (1 - 0.05)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.0975))


def test_ema_teacher_follows_the_student_and_frozen_stays_fixed():
    student = tiny_linear(0.0)
    ema = Teacher(student, Config(teacher_regularization="ema", teacher_update_rate=0.5))
    frozen = Teacher(student, Config(teacher_regularization="frozen"))
    ema_zero = Teacher(student, Config(teacher_regularization="ema", teacher_update_rate=0.0))
    with torch.no_grad():
        student.weight.fill_(2.0)                      # an optimizer step
    for t in (ema, frozen, ema_zero):
        t.after_rollout_batch(student)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 1.0))
    assert torch.all(frozen.model.weight == 0) and torch.all(ema_zero.model.weight == 0)


def test_trust_region_lerps_logits_of_reference_and_student():
    assert torch.allclose(trust_region_logits(torch.zeros(3), torch.full((3,), 10.0), 0.05),
                          torch.full((3,), 0.5))


class Scale(torch.nn.Module):
    """A stand-in 'model' whose logits are its weight times the input."""
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x):
        return type("Out", (), {"logits": self.w * x})()


def test_teacher_kinds_produce_the_promised_logits():
    policy, x = Scale(1.0), torch.ones(2)
    trust = Teacher(policy, Config(teacher_regularization="trust-region", teacher_update_rate=0.25))
    live = Teacher(policy, Config(teacher_regularization="live"))
    with torch.no_grad():
        policy.w.fill_(5.0)                            # the student moves; the reference does not
    def score(model):
        return model(x).logits
    assert torch.allclose(live.logits(policy, score), torch.full((2,), 5.0))
    assert torch.allclose(trust.logits(policy, score), torch.full((2,), 1.0 + 0.25 * 4.0))
    assert not live.logits(policy, score).requires_grad


def test_reset_reinitialises_the_teacher_from_the_policy():
    policy = Scale(1.0)
    teacher = Teacher(policy, Config(teacher_regularization="frozen"))
    with torch.no_grad():
        policy.w.fill_(3.0)
    teacher.reset(policy)
    assert teacher.model.w.item() == pytest.approx(3.0)


def test_teacher_path_mixes_a_checkpoint_into_the_teacher(tmp_path):
    from sdpo_cl import build_lab_model, build_lab_tokenizer
    tok = build_lab_tokenizer()
    student, ckpt = build_lab_model(tok, seed=0), build_lab_model(tok, seed=1)
    ckpt.save_pretrained(tmp_path)
    teacher = Teacher(student, Config(teacher_path=str(tmp_path), teacher_init_alpha=0.25))
    for t, s, c in zip(teacher.model.parameters(), student.parameters(), ckpt.parameters()):
        assert torch.allclose(t, 0.25 * c + 0.75 * s, atol=1e-6)


def prefixes_and_responses():
    """Three left-padded teacher prefixes of different lengths and five responses (two ending
    early with EOS) on a randomly initialised lab model."""
    from sdpo_cl import build_lab_model, build_lab_tokenizer, tokenize_prompts
    tok = build_lab_tokenizer()
    model = build_lab_model(tok, seed=3)
    prefix_ids, prefix_mask = tokenize_prompts(tok, ["12+5=\nCorrect: 17\n", "7+1=", "a"], "cpu")
    torch.manual_seed(0)
    response_ids = torch.randint(5, 60, (5, 6))
    response_mask = torch.ones(5, 6)
    response_mask[1, 3:] = 0
    response_mask[4, 1:] = 0
    return model, prefix_ids, prefix_mask, torch.tensor([0, 0, 1, 2, 1]), response_ids, \
        response_mask


def test_shared_prefix_scoring_equals_one_forward_per_sequence():
    from sdpo_cl import response_logits, sequence_inputs
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    with torch.no_grad():
        full = model(**sequence_inputs(p_ids[rows], p_mask[rows], r_ids, r_mask)).logits[:, :-1]
    shared = response_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    assert shared.shape == full.shape == (5, 6, model.config.vocab_size)
    valid = r_mask.bool()
    assert torch.allclose(shared[valid], full[valid], atol=1e-5)


def test_shared_prefix_scoring_of_a_one_token_response():
    from sdpo_cl import response_logits, sequence_inputs
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    with torch.no_grad():
        full = model(**sequence_inputs(p_ids[rows], p_mask[rows], r_ids[:, :1], r_mask[:, :1])
                     ).logits[:, :-1]
    shared = response_logits(model, p_ids, p_mask, rows, r_ids[:, :1], r_mask[:, :1])
    assert torch.allclose(shared, full, atol=1e-5)


def test_a_training_policy_with_gradient_checkpointing_still_scores_with_its_prefix():
    """The live teacher is the policy in training mode; the prefix cache must not be dropped."""
    from sdpo_cl import response_logits
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    expected = response_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    model.gradient_checkpointing_enable()
    model.train()
    got = response_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    assert model.training
    assert torch.allclose(got, expected, atol=1e-6)


QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_like_tokenizer():
    from sdpo_cl import build_lab_tokenizer
    tok = build_lab_tokenizer()
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    return tok


def test_thinking_is_off_unless_switched_on():
    from sdpo_cl import format_prompt
    tok = qwen3_like_tokenizer()
    assert format_prompt(tok, "Q", "S") == "<|system|>S<|user|>Q<|assistant|><think>\n\n</think>\n\n"
    assert format_prompt(tok, "Q", "S", enable_thinking=True) == "<|system|>S<|user|>Q<|assistant|>"


def test_the_teacher_sees_exactly_the_official_prompt():
    """One failed sample's teacher prompt as the training step builds and tokenizes it: the system
    message kept, the sibling's answer (thinking stripped) in the official templates, the chat
    template with thinking off."""
    import sdpo_cl as s
    tok = qwen3_like_tokenizer()
    completions = ["<think>add</think>\n4", "5"]
    ids = torch.tensor([[tok.convert_tokens_to_ids("4")] * 2] * 2)
    rollout = s.Rollout(ids, torch.ones(2, 2), ids, torch.ones(2, 2), torch.zeros(2, 2),
                        completions)
    examples = [{"prompt": "2+2=?", "system": "Be brief.", "answer": "4"}] * 2
    task = s.Task("t", None, None, lambda c, ex: 0.0)
    targets = s.loss_targets(rollout, examples, torch.tensor([1.0, 0.0]), task, tok,
                             Config(group_size=2))
    assert targets.teacher_of.tolist() == [-1, 0]          # only the failed sample has a teacher
    text = tok.decode(targets.teacher_ids[0][targets.teacher_mask[0] > 0])
    assert text == ("<|system|>Be brief.<|user|>2+2=?\nCorrect solution:\n\n4\n\n"
                    "Correctly solve the original question.<|assistant|><think>\n\n</think>\n\n")
