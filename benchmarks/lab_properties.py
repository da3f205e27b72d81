"""The properties of a lab's shipped base, measured on the base alone (docs/lab.md reports them).

    python benchmarks/lab_properties.py              # the lab in the paper's regime
    python benchmarks/lab_properties.py --lab lab-short
    python benchmarks/lab_properties.py --learnability   # each stage trained alone, 3 seeds
    python benchmarks/lab_properties.py --interference   # sequential SFT: does the lab forget

Per family: the answer's length in tokens and its final answer's; how many different right
traces a prompt has (distinct solutions among 50 drawn); the base's test accuracy with its
standard error, and with a correct demonstration in the prompt (the self-teacher's accuracy);
the lift between them; at temperature 1 on 64 training prompts x 8 samples, the first-step
reward and the share of groups all alike; how often the teacher's most likely token departs from
a right student's own token (measures.teacher_departure); the share of samples in the
family's form. All seeded; about a minute on 2 CPU cores. With a ladder (the ood finding's
probes), its smallest base accuracy and the MMD of every set from each trained family.

--interference: sequential supervised fine-tuning (the reference method, `--methods sft`)
through the lab's stages at the findings' lengths (`--steps paper`), 3 seeds: its forgetting with
a 95% interval. The lab can forget when it is at least 10 points, beyond noise (docs/lab.md).

--learnability: each trained family's stage at its budget (the paper's length, scaled as
`--steps paper` scales it) trained alone from the base by GRPO and by SDPO (EMA 0.05), with
run_sequence.py's own code and settings, and its own-stage gain over the seeds: the lab is
learnable when every stage gains at least 20 points by both methods (the design's property, a
property of the lab and its budget, not of what a method kept from earlier stages).
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_forgetting as ef    # noqa: E402
from harness import measures  # noqa: E402
import run_sequence             # noqa: E402
import sdpo_cl as sc            # noqa: E402
from harness import lab, lab_families   # noqa: E402


def family_properties(model, tokenizer, lab_name, name, cfg) -> dict:
    spec = lab.LABS[lab_name]
    family, task = spec.families[name], lab.make_lab_task(name, lab_name)
    rng = random.Random(0)
    tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)   # noqa: E731
    sc.seed_everything("lab-properties", lab_name, name)
    plain = sc.task_accuracy(model, tokenizer, task, cfg)
    demo = sc.task_accuracy(model, tokenizer, task, cfg, with_demonstration=True)
    signal = measures.rollout_signal(model, tokenizer, task, cfg, n_prompts=64)
    departure = measures.teacher_departure(model, tokenizer, task, cfg)
    samples = plain["completions"]
    return {
        "answer_tokens": statistics.mean(tokens(ex["answer"]) for ex in task.test),
        "final_tokens": statistics.mean(tokens(ex.get("final", ex["answer"])) for ex in task.test),
        "traces": statistics.mean(len({family.solve(ex, rng, False) for _ in range(50)})
                                  for ex in task.test),
        "accuracy": plain["accuracy"], "stderr": plain["stderr"],
        "teacher_accuracy": demo["accuracy"], "lift": demo["accuracy"] - plain["accuracy"],
        "reward_t1": signal["reward"], "all_alike": signal["zero_adv_groups"],
        "departure": departure["departure"], "same_path": departure["same_path"],
        "sample_tokens": statistics.mean(tokens(c) for c in samples),
        "well_formed": sum(task.well_formed(c, None) for c in samples) / len(samples)}


def learnability(lab_name, seeds: str, out) -> dict:
    """{family: {method: own-stage gain (points) per seed}}, each stage trained alone; `seeds`
    as run_sequence.py's --seeds takes them."""
    spec, t0, gains = lab.LABS[lab_name], time.time(), {}
    budgets = run_sequence.stage_steps("paper", lab_name, len(spec.sequence))
    for name, steps in zip(spec.sequence, budgets):
        results = run_sequence.main([
            "--model", lab_name, "--tasks", name, "--probes", "", "--steps", str(steps),
            "--methods", "grpo,sdpo", "--seeds", seeds,
            "--out", str(out), "--name", f"learnability-{lab_name}-{name}"])
        gains[name] = {m: [100 * (r["R"][1][0] - r["R"][0][0]) for r in runs.values()]
                       for m, runs in results["runs"].items()}
    print("\n| family | batches | method | own-stage gain, mean [95% interval] | per seed |")
    print("|---|---|---|---|---|")
    means = []
    for (name, by_method), steps in zip(gains.items(), budgets):
        for m, g in by_method.items():
            diff = ef.paired_difference(g, [0.0] * len(g))
            means.append(diff["mean"])
            print(f"| {name} | {steps} | {m} | {ef.interval_text(diff)} | "
                  f"{', '.join(f'{x:+.1f}' for x in g)} |")
    print(f"\nlearnable (every mean at least +20): {min(means) >= 20}; "
          f"{time.time() - t0:.0f}s")
    return gains


def interference(lab_name, seeds: str, out) -> dict:
    """Sequential SFT through the lab's sequence at the paper's stage lengths (scaled as
    --steps paper scales them), run_sequence.py's own code and settings: forgetting, BWT, ACC,
    plasticity and FWT per seed, and forgetting's mean with its 95% interval."""
    t0 = time.time()
    results = run_sequence.main(["--model", lab_name, "--methods", "sft", "--steps", "paper",
                                 "--seeds", seeds, "--probes", "", "--out", str(out),
                                 "--name", f"interference-{lab_name}"])
    per_seed = [ef.summarize(r["R"], results["trained"]) for r in results["runs"]["sft"].values()]
    print("\n| seed | forgetting | BWT | ACC | plasticity | FWT |\n|---|---|---|---|---|---|")
    for seed, m in zip(results["runs"]["sft"], per_seed):
        print(f"| {seed} | " + " | ".join(f"{100 * m[k]:.1f}" for k in
                                          ("forgetting", "bwt", "acc", "plasticity", "fwt")) + " |")
    forgetting = ef.paired_difference([m["forgetting"] for m in per_seed], [0.0] * len(per_seed))
    print(f"\nsequential SFT forgets {ef.interval_text(forgetting, 100)} points over "
          f"{len(per_seed)} seeds; the lab can forget (at least 10, beyond noise): "
          f"{forgetting['mean'] >= 0.10 and (forgetting['low'] or 0) > 0}; {time.time() - t0:.0f}s")
    return forgetting


def build_parser():
    """The command line (a test parses every command the docs show)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default="lab", choices=list(lab.LABS))
    ap.add_argument("--learnability", action="store_true",
                    help="train each stage alone from the base by GRPO and SDPO (a few minutes)")
    ap.add_argument("--interference", action="store_true", help="sequential SFT through the "
                    "lab's stages, 3 seeds: does the lab forget (a minute or two)")
    ap.add_argument("--seeds", default="0,1,2", help="with --learnability or --interference")
    ap.add_argument("--out", default="runs", help="with --learnability: the run folders' parent")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.learnability:
        return learnability(args.lab, args.seeds, Path(args.out))
    if args.interference:
        return interference(args.lab, args.seeds, Path(args.out))
    t0 = time.time()
    model, tokenizer = lab.lab_base(args.lab)
    cfg = lab.lab_config(args.lab)
    spec = lab.LABS[args.lab]
    print(f"| family | answer tokens (final) | traces | base acc | with demo | lift | "
          f"reward T=1 | all alike | departure (same path) | sampled tokens | in form |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name in spec.sequence + spec.probes + spec.ladder:
        p = rows[name] = family_properties(model, tokenizer, args.lab, name, cfg)
        dep = ("n/a" if p["departure"] is None else
               f"{100 * p['departure']:.1f}% ({100 * p['same_path']:.0f}%)")
        print(f"| {name} | {p['answer_tokens']:.1f} ({p['final_tokens']:.1f}) | "
              f"{p['traces']:.1f} | {100 * p['accuracy']:.1f} ± {100 * p['stderr']:.1f} | "
              f"{100 * p['teacher_accuracy']:.1f} | {100 * p['lift']:+.1f} | "
              f"{p['reward_t1']:.2f} | {100 * p['all_alike']:.0f}% | {dep} | "
              f"{p['sample_tokens']:.1f} | {100 * p['well_formed']:.0f}% |", flush=True)
    trained = [rows[n] for n in spec.sequence]
    mean_answer = statistics.mean(p['answer_tokens'] for p in trained)
    print(f"\ntrained families: mean answer {mean_answer:.1f} tokens, mean teacher accuracy "
          f"{100 * statistics.mean(p['teacher_accuracy'] for p in trained):.1f}%, smallest lift "
          f"{100 * min(p['lift'] for p in trained):+.1f} points")
    if spec.ladder:
        print(f"ladder: smallest base accuracy "
              f"{100 * min(rows[n]['accuracy'] for n in spec.ladder):.1f}% (the design asks 15)")
        print(ladder_distances(model, tokenizer, args.lab))
    print(f"{time.time() - t0:.0f}s")
    return rows


def ladder_distances(model, tokenizer, lab_name) -> str:
    """The ood finding's distances on the base alone: the MMD (measures.task_distances)
    of every evaluation set from each trained family's training set, each cell with what the
    set shares with that family (lab_families.relation)."""
    spec = lab.LABS[lab_name]
    tasks = [lab.make_lab_task(n, lab_name) for n in spec.sequence + spec.probes + spec.ladder]
    d = measures.task_distances(model, tokenizer, tasks[:len(spec.sequence)], tasks)
    lines = ["\n| MMD from | " + " | ".join(t.name for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for a in spec.sequence:
        lines.append(f"| {a} | " + " | ".join(
            f"{d[a][t.name]:.3f} {lab_families.relation(a, t.name)[0]}" for t in tasks) + " |")
    return "\n".join(lines) + ("\n(the letter: the set shares the family's b: content and format, "
                               "c: content, f: format, n: neither)")


if __name__ == "__main__":
    main()
