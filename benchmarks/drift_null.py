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
direction, measures how consistently its updates point, not how many there were.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_forgetting as ef    # noqa: E402
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
    return ef.parameter_drift(policy, base)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default="lab", choices=list(lab.LABS))
    ap.add_argument("--runs", help="a run folder whose final drift to print beside the nulls")
    args = ap.parse_args(argv)
    spec = lab.LABS[args.lab]
    stages = [max(1, round(n * spec.paper_scale)) for n in lab.PAPER_STEPS]
    base, _ = lab.lab_base(args.lab)
    cfg = lab.lab_config(args.lab)
    print(f"{args.lab}: stages {stages}, lr {cfg.lr:g}, warm-up {cfg.warmup_steps}, weight decay "
          f"{cfg.weight_decay:g}, clip {cfg.grad_clip:g}")
    print("| optimizer steps | gradient | param drift % | subspace angle ° |")
    print("|---|---|---|---|")
    for label, per_batch in (("SDPO (1 per batch)", 1), ("GRPO (4 per batch)", 4)):
        for gradient in ("zero", "random", "fixed"):
            d = replay(base, cfg, stages, per_batch, gradient)
            print(f"| {label}: {sum(stages) * per_batch} | {gradient} | "
                  f"{100 * d['overall']:.2f} | {d['subspace_angle']:.2f} |", flush=True)
    if args.runs:
        results = json.loads((Path(args.runs) / "results.json").read_text())
        print("\n| method | seed | param drift % | subspace angle ° |\n|---|---|---|---|")
        for method, seeds in results["runs"].items():
            for seed, run in seeds.items():
                last = run["records"][-1].get("param_drift", {})
                if last:
                    print(f"| {method} | {seed} | {100 * last['overall']:.2f} | "
                          f"{last['subspace_angle']:.2f} |")


if __name__ == "__main__":
    main()
