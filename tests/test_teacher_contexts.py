"""SDPO's teacher context: which sibling is the demonstration, when feedback is used, the
official templates, thinking stripped, and the exact prompt the teacher sees."""
import torch

from sdpo_cl import Config, strip_thinking, teacher_contexts

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
    """As the official SDPO config file renders them (`|-` block scalars: no trailing newlines)."""
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


QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_like_tokenizer():
    from harness.lab import build_lab_tokenizer
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


def test_a_teacher_prompt_longer_than_max_reprompt_len_is_cut_on_the_right():
    """verl tokenizes the teacher's messages with max_length=max_reprompt_len and truncation, on
    the tokenizer's right: the prompt's start is kept, its end (the instruction) lost."""
    import sdpo_cl as s
    tok = qwen3_like_tokenizer()
    full = "<|user|>" + "x" * 50
    ids, mask = s.tokenize_prompts(tok, [full, "<|user|>y"], "cpu", max_length=10)
    assert ids.shape[1] == 10 and mask[0].sum() == 10
    assert tok.decode(ids[0]) == full[:len("<|user|>") + 9]            # one special token + 9 x
    assert tok.decode(ids[1][mask[1] > 0]) == "<|user|>y"               # short ones: untouched
