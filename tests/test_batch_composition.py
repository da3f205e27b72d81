"""What a rollout batch draws (sdpo_cl.next_batch): the current task's prompts in a shuffled pass,
a share replayed from earlier tasks (replay_fraction), or every prompt from all tasks (multitask),
each scored by its own task."""
import random

import sdpo_cl as s
from harness import lab


def rows(name, n):
    return [{"prompt": f"{name}{i}", "answer": str(i)} for i in range(n)]


def task(name, n=40, budget=None):
    return s.Task(name, rows(name, n), rows(name, 4),
                  lambda c, ex, name=name: float(c == name), max_new_tokens=budget)


def test_replay_draws_its_share_from_earlier_tasks_and_the_rest_in_order():
    cfg = lab.lab_config("lab-short", prompts_per_step=32, replay_fraction=0.25)
    current, earlier = task("cur"), [task("old1", budget=4), task("old2", budget=9)]
    order = []
    examples, batch_task = s.next_batch(current, earlier, cfg, random.Random(0), order)
    names = [ex["task"] for ex in examples]
    assert names[:24] == ["cur"] * 24 and set(names[24:]) <= {"old1", "old2"}
    assert len(order) == 40 - 24                      # the pass over the current task goes on
    assert batch_task.reward("old2", examples[-1]) == float(examples[-1]["task"] == "old2")


def test_without_replay_the_batch_is_the_task_alone():
    cfg = lab.lab_config("lab-short", prompts_per_step=8)
    current = task("cur")
    examples, batch_task = s.next_batch(current, [task("old")], cfg, random.Random(0), [])
    assert batch_task is current and all("task" not in ex for ex in examples)


def test_multitask_draws_every_prompt_from_all_tasks():
    cfg = lab.lab_config("lab-short", prompts_per_step=400, multitask=True)
    everything = [task("a"), task("b"), task("c")]
    examples, _ = s.next_batch(everything[0], everything, cfg, random.Random(0), [])
    counts = {n: sum(ex["task"] == n for ex in examples) for n in "abc"}
    assert all(100 < c < 170 for c in counts.values())    # about a third each


def test_a_mixture_scores_each_example_with_its_own_task():
    mixed = s.mix_tasks([task("a", budget=4), task("b", budget=9)])
    assert mixed.reward("a", {"task": "a"}) == 1.0 and mixed.reward("a", {"task": "b"}) == 0.0
    assert mixed.max_new_tokens == 9
