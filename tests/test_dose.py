"""The dose of misalignment, a method knob: a share p of the teacher contexts show a misleading
demonstration instead of a successful sibling's (harness/dose.py prepares them per row: the
answer to another prompt of the task, or another task's answer). p = 0 is SDPO exactly; at p = 1
every context with a demonstration misleads; in between, the share is p within sampling error;
a misleading demonstration never comes from the sample's own prompt."""
import random

import pytest

import sdpo_cl as s
from harness import dose, lab


def contexts(share, kind="content", n_groups=50, group_size=4):
    """teacher_contexts of n_groups groups, each with one success (its first sample), every
    sample's misleading demonstration 'MISLEAD<i>'; seeded."""
    cfg = s.Config(group_size=group_size, misleading_share=share, misleading_kind=kind)
    n = n_groups * group_size
    prompts = [f"p{i // group_size}" for i in range(n)]
    completions = [f"answer {i}" for i in range(n)]
    rewards = [1.0 if i % group_size == 0 else 0.0 for i in range(n)]
    random.seed(0)
    return s.teacher_contexts(prompts, completions, rewards, [None] * n, group_size, cfg,
                              [f"MISLEAD{i}" for i in range(n)])


def test_a_dose_of_0_is_sdpo_exactly_and_draws_nothing():
    random.seed(0)
    before = random.getstate()
    cfg = s.Config(group_size=4)
    plain = s.teacher_contexts(["p"] * 4, ["a", "b", "c", "d"], [1.0, 0, 0, 0], [None] * 4, 4,
                               cfg)
    assert random.getstate() == before
    assert contexts(0.0)[:4] == [None] + [s.teacher_prompt("p0", cfg, "answer 0")] * 3
    assert plain[1] == s.teacher_prompt("p", cfg, "a")


def test_a_dose_of_1_misleads_every_context_with_a_demonstration():
    got = contexts(1.0)
    shown = [c for c in got if c is not None]
    assert len(shown) == 150 and all("MISLEAD" in c and "answer" not in c for c in shown)
    assert got[0] is None            # the group's one success has no sibling to show: still none


def test_the_share_of_misleading_contexts_is_p_within_sampling_error():
    got = [c for c in contexts(0.3, n_groups=500) if c is not None]        # 1,500 contexts
    share = sum("MISLEAD" in c for c in got) / len(got)
    assert abs(share - 0.3) <= 3 * (0.3 * 0.7 / len(got)) ** 0.5


def test_a_misleading_demonstration_never_comes_from_the_samples_own_prompt():
    """Rows whose answer names their prompt (prompts repeat, as a lab family's do): the content
    kind is always another prompt's answer of the task, the format kind another task's."""
    from types import SimpleNamespace
    make = lambda name, n: SimpleNamespace(name=name, train=[                 # noqa: E731
        {"prompt": f"{name}{i % 7}", "answer": f"ans-{name}{i % 7}"} for i in range(n)])
    math, tool = make("math", 300), make("tool", 50)
    dose.add_misleading([math, tool], {"content", "format"})
    for row in math.train:
        assert row["misleading_content"].startswith("ans-math")
        assert row["misleading_content"] != row["answer"]
        assert row["misleading_format"].startswith("ans-tool")


def test_the_format_kind_needs_another_task():
    math = lab.make_lab_task("math", "lab-short", n_train=20)
    with pytest.raises(ValueError, match="at least two tasks"):
        dose.add_misleading([math], {"format"})


def test_a_dose_without_prepared_rows_is_one_clear_error(random_lab):
    model, tok = random_lab
    cfg = s.Config(group_size=2, prompts_per_step=1, max_new_tokens=2, misleading_share=0.5)
    task = lab.make_lab_task("math", "lab-short", n_train=2, n_test=1)
    task.reward = lambda completion, example: 1.0
    rollout, samples, rewards = s.sample_rollout(model, tok, task, [task.train[0]], cfg)
    with pytest.raises(ValueError, match="prepare the tasks with harness/dose.py"):
        s.loss_targets(rollout, samples, rewards, task, tok, cfg)
