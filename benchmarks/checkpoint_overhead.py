"""What a mid-stage checkpoint costs: the seconds to write one (and to read it back) and its size
on disk, for a model's full fine-tuning with SDPO's EMA teacher, against the time of a rollout
batch. --checkpoint-every N adds (write seconds) / (N x step seconds) to a stage.

    python benchmarks/checkpoint_overhead.py                      # the lab
    python benchmarks/checkpoint_overhead.py --model <path>.gguf --step-seconds 22

The policy, the teacher and AdamW's two moments (after one real optimizer step, so they exist)
are written as run_sequence.py writes them (harness/runs.py: save_midstage, then load_midstage).
"""
import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20


def measure(model_name: str, repeats: int = 3) -> dict:
    import sdpo_cl as sc
    from harness import runs
    from harness.loading import load_policy
    policy, _ = load_policy(model_name)
    cfg = sc.Config(lr=1e-6, warmup_steps=0)
    teacher = sc.Teacher(policy, cfg)
    optimizer, scheduler = sc.make_optimizer(policy, cfg)
    loss = sum(p.float().square().mean() for p in policy.parameters())   # one step: moments
    loss.backward()
    optimizer.step()
    scheduler.step()
    state = dict(policy=policy, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                 rng=random.Random(0), order=list(range(100)), history=[{"loss": 1.0}])
    root = Path(tempfile.mkdtemp(prefix="ckpt-"))
    try:
        writes, reads = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            runs.save_midstage(root, 1, i, state)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runs.load_midstage(root, 1, state)
            reads.append(time.perf_counter() - t0)
        size = folder_mb(root / "midstage")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"parameters": sum(p.numel() for p in policy.parameters()), "mb": size,
            "write": min(writes), "read": min(reads)}


def build_parser():
    """The command line (a test parses every command the docs show)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lab", help="lab, lab-trace, lab-short, a hub id, a "
                    "folder or a .gguf file (default: lab)")
    ap.add_argument("--step-seconds", type=float, help="the seconds of one rollout batch, to "
                    "give the overhead per step (default: not computed)")
    ap.add_argument("--repeats", type=int, default=3, help="checkpoints written (the fastest "
                    "is reported)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    m = measure(args.model, args.repeats)
    print(f"{args.model}: {m['parameters'] / 1e6:.2f}M parameters; a mid-stage checkpoint "
          f"(policy, EMA teacher, AdamW moments, loop state) is {m['mb']:.1f} MB, written in "
          f"{m['write']:.2f} s, read back in {m['read']:.2f} s")
    if args.step_seconds:
        for every in (1, 10):
            share = m["write"] / (every * args.step_seconds)
            print(f"  --checkpoint-every {every}: +{100 * share:.1f}% of a stage's time at "
                  f"{args.step_seconds:g} s per rollout batch")


if __name__ == "__main__":
    main()
