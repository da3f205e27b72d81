"""Curves where practitioners look (`run_sequence.py --report-to tensorboard` or `wandb`): the
per-step metrics that log.jsonl holds, streamed as the run goes, and each stage's accuracies.
log.jsonl stays the source of truth; the packages are optional, and asking for one that is not
installed is one clear error before the run starts.

Tags: `<method>/seed<s>/stage<k>-<task>/<metric>` for a step's metric, at the run's global
rollout batch (stage k's batches after those of the stages before it), and
`<method>/seed<s>/accuracy/<task>` for the accuracies after each stage, at the batch that stage
ended on (the base at 0)."""
from __future__ import annotations

import importlib.util
import numbers

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}   # --report-to: its package


def check_backends(names) -> None:
    """Refuse an unknown backend, or one whose package is not installed, naming the fix."""
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"--report-to {name!r}: allowed are {', '.join(BACKENDS)}")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise ValueError(f"--report-to {name} needs the {BACKENDS[name]} package, which is "
                             f"not installed: pip install {BACKENDS[name]} (log.jsonl has every "
                             f"metric without it)")


class Tracker:
    """The run's curves in each backend asked for; every scalar at a global rollout batch."""

    def __init__(self, names, folder, steps):
        self.offsets = [sum(steps[:k]) for k in range(len(steps) + 1)]   # batches before stage
        self.writers, self.wandb = [], None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.writers.append(SummaryWriter(log_dir=str(folder / "tensorboard")))
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project="sdpo-cl", name=folder.name, dir=str(folder),
                                    reinit="finish_previous")

    def scalar(self, tag, value, step):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            for writer in self.writers:
                writer.add_scalar(tag, value, step)
            if self.wandb is not None:
                self.wandb.log({tag: value, "batch": step})

    def step(self, method, seed, metrics):
        """One line of log.jsonl: its stage, task and step place it; every number is a curve."""
        k, at = metrics["stage"], self.offsets[metrics["stage"] - 1] + metrics["step"] + 1
        for key, value in metrics.items():
            if key not in ("stage", "step", "seed"):
                self.scalar(f"{method}/seed{seed}/stage{k}-{metrics['task']}/{key}", value, at)

    def stage(self, method, seed, k, record):
        """The accuracies after stage k (0: the base model)."""
        for task, accuracy in record["accuracy"].items():
            self.scalar(f"{method}/seed{seed}/accuracy/{task}", accuracy, self.offsets[k])
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
