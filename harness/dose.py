"""A dose of misalignment for the self-teacher: a method knob (Config.misleading_share, a share p
of the teacher contexts, and Config.misleading_kind), never a change to the lab or the data.

With probability p a sample's teacher context shows, instead of a successful sibling's answer, a
misleading demonstration prepared here for every training row:

- content ("misleading_content"): the gold answer to another prompt of the same task, the right
  form with the wrong content;
- format ("misleading_format"): the gold answer to a prompt of another task of the run, in that
  task's own form and wrapper (the paper's artifact: math's \\boxed shown to a tool-use teacher).

Neither ever comes from the row's own prompt. It works on any task whose rows carry an answer:
the lab's families (whose answers are full traces) and the paper's data alike (whose answers are
what its files hold). Seeded by the task's name: every method and seed sees the same ones.
"""
from __future__ import annotations

import random

KINDS = ("content", "format")


def misleading_rows(task, others) -> list:
    """The training rows of `task` as dicts, each with misleading_content (another row's answer,
    to a different prompt) and misleading_format (a row of one of `others`)."""
    rows = [dict(row) for row in task.train]
    rng = random.Random(f"misleading-{task.name}")
    foreign = [dict(row) for other in others for row in other.train]
    for row in rows:
        other = row
        while other["prompt"] == row["prompt"]:
            other = rows[rng.randrange(len(rows))]
        row["misleading_content"] = other["answer"]
        row["misleading_format"] = foreign[rng.randrange(len(foreign))]["answer"] if foreign else None
    return rows


def add_misleading(tasks, kinds) -> None:
    """Give every training row of `tasks` its misleading demonstrations (in place), for the
    kinds the run's configs use; one clear error where a kind cannot be made (a task whose rows
    all share one prompt, or `format` with a single task)."""
    from datasets import Dataset
    for task in tasks:
        if len({row["prompt"] for row in task.train}) < 2:
            raise ValueError(f"misleading demonstrations: task {task.name!r} has fewer than two "
                             f"distinct training prompts, so no answer to another prompt exists")
        if "format" in kinds and len(tasks) < 2:
            raise ValueError("misleading_kind='format' shows another task's answer: the run "
                             "needs at least two tasks (trained or probes)")
        rows = misleading_rows(task, [t for t in tasks if t is not task])
        task.train = Dataset.from_list(rows) if hasattr(task.train, "column_names") else rows
