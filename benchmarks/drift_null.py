"""How much parameter drift the optimizer alone makes: the null check for the drift finding.

    python benchmarks/drift_null.py                       # the lab, the paper's stages
    python benchmarks/drift_null.py --runs runs/continual # and the real runs' drift beside it

AdamW moves every weight that has a gradient by about the learning rate per step, whatever the
gradient's size, so a drift measure can end up counting optimizer steps. This replays the exact
optimizer schedule of each method over the sequence (a fresh AdamW per stage, the lab's learning
rate, warm-up, weight decay and clipping; GRPO four optimizer steps per rollout batch, SDPO
one) from the shipped base with three synthetic gradients: zero (weight decay alone), a fresh
random direction each step (steps that do not agree: drift grows as the square root of their
number), and one fixed random direction (steps that all agree: drift grows with their number).
A real run's drift far above the random walk of the same step count, and below the fixed
direction, measures how consistently its updates point, not how many there were. Printed for
relative L2 and the mean angle (this project's measures) and for the paper's four (NSS, the largest
principal angle, principal-mask overlap and update); with --runs, the runs' own at the sequence's
end, read from their last stage's checkpoint.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import measures  # noqa: E402
import sdpo_cl as sc            # noqa: E402
from harness import lab         # noqa: E402


def replay(base, cfg, stages, updates_per_batch, gradient, seed=0) -> dict:
    """Drift of `base` after the optimizer schedule with synthetic gradients."""
    policy = copy.deepcopy(base).train()
    gen = torch.Generator().manual_seed(seed)
    fixed = [torch.randn(p.shape, generator=gen) for p in policy.parameters()]
    for n in stages:
        optimizer, scheduler = sc.make_optimizer(policy, cfg)
        for _ in range(n):
            for _ in range(updates_per_batch):
                for p, f in zip(policy.parameters(), fixed):
                    p.grad = {"zero": lambda: torch.zeros_like(p),
                              "random": lambda: torch.randn(p.shape, generator=gen),
                              "fixed": lambda: f.clone()}[gradient]()
                sc.clipped_optimizer_step(policy, optimizer, cfg.grad_clip)
            scheduler.step()
    return drift_of(policy, base)


def drift_of(policy, base) -> dict:
    d = measures.parameter_drift(policy, base)
    return {"l2": 100 * d["overall"], "angle": d["subspace_angle"], **measures.paper_drift(policy, base)}


COLUMNS = ("param drift %", "mean angle °", "NSS ×1e3", "max angle °", "PM overlap %",
           "PM update %")


def header(*first) -> str:
    names = first + COLUMNS
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def cells(d) -> str:
    return (f"{d['l2']:.2f} | {d['angle']:.2f} | {1e3 * d['nss']:.2f} | {d['max_angle']:.2f} | "
            f"{100 * d['pm_overlap']:.2f} | {100 * d['pm_update']:.1f}")


def run_drift(folder, base) -> list:
    """(method, seed, drift) at the end of each finished run in a run folder, from the weights of
    its last stage's checkpoint."""
    from harness import runs
    rows = []
    for method_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for seed_dir in sorted(method_dir.glob("seed*")):
            done = runs.last_finished_stage(seed_dir)
            if done > 0:
                policy = copy.deepcopy(base)
                runs.load_stage_weights(seed_dir, done, policy, None)
                rows.append((method_dir.name, seed_dir.name[4:], drift_of(policy, base)))
    return rows


def build_parser():
    """The command line (a test parses every command the docs show)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default="lab", choices=list(lab.LABS))
    ap.add_argument("--runs", help="a run folder whose final drift to print beside the nulls")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    spec = lab.LABS[args.lab]
    stages = [max(1, round(n * spec.paper_scale)) for n in lab.PAPER_STEPS]
    base, _ = lab.lab_base(args.lab)
    cfg = lab.lab_config(args.lab)
    print(f"{args.lab}: stages {stages}, lr {cfg.lr:g}, warm-up {cfg.warmup_steps}, weight decay "
          f"{cfg.weight_decay:g}, clip {cfg.grad_clip:g}")
    print(header("optimizer steps", "gradient"))
    for label, per_batch in (("SDPO", 1), ("GRPO", 4)):
        for gradient in ("zero", "random", "fixed"):
            d = replay(base, cfg, stages, per_batch, gradient)
            print(f"| {label}: {sum(stages) * per_batch} | {gradient} | {cells(d)} |", flush=True)
    if args.runs:
        print("\n" + header("method", "seed"))
        for method, seed, d in run_drift(args.runs, base):
            print(f"| {method} | {seed} | {cells(d)} |", flush=True)


if __name__ == "__main__":
    main()
