"""The properties of a lab's shipped base, measured on the base alone (docs/lab.md reports them).

    python benchmarks/lab_properties.py              # the lab in the paper's regime
    python benchmarks/lab_properties.py --lab lab-short

Per family: the answer's length in tokens and its final answer's; how many different right
traces a prompt has (distinct solutions among 50 drawn); the base's test accuracy with its
standard error, and with a correct demonstration in the prompt (the self-teacher's accuracy);
the lift between them; at temperature 1 on 64 training prompts x 8 samples, the first-step
reward and the share of groups all alike; how often the teacher's most likely token departs from
a right student's own token (eval_forgetting.teacher_departure); the share of samples in the
family's form. All seeded; about a minute on 2 CPU cores.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_forgetting as ef    # noqa: E402
import sdpo_cl as sc            # noqa: E402
from harness import lab         # noqa: E402


def family_properties(model, tokenizer, lab_name, name, cfg) -> dict:
    spec = lab.LABS[lab_name]
    family, task = spec.families[name], lab.make_lab_task(name, lab_name)
    rng = random.Random(0)
    tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)   # noqa: E731
    sc.seed_everything("lab-properties", lab_name, name)
    plain = sc.task_accuracy(model, tokenizer, task, cfg)
    demo = sc.task_accuracy(model, tokenizer, task, cfg, with_demonstration=True)
    signal = ef.rollout_signal(model, tokenizer, task, cfg, n_prompts=64)
    departure = ef.teacher_departure(model, tokenizer, task, cfg)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default="lab", choices=list(lab.LABS))
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tokenizer = lab.lab_base(args.lab)
    cfg = lab.lab_config(args.lab)
    spec = lab.LABS[args.lab]
    print(f"| family | answer tokens (final) | traces | base acc | with demo | lift | "
          f"reward T=1 | all alike | departure (same path) | sampled tokens | in form |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name in spec.sequence + spec.probes:
        p = rows[name] = family_properties(model, tokenizer, args.lab, name, cfg)
        dep = ("n/a" if p["departure"] is None else
               f"{100 * p['departure']:.1f}% ({100 * p['same_path']:.0f}%)")
        print(f"| {name} | {p['answer_tokens']:.1f} ({p['final_tokens']:.1f}) | "
              f"{p['traces']:.1f} | {100 * p['accuracy']:.1f} ± {100 * p['stderr']:.1f} | "
              f"{100 * p['teacher_accuracy']:.1f} | {100 * p['lift']:+.1f} | "
              f"{p['reward_t1']:.2f} | {100 * p['all_alike']:.0f}% | {dep} | "
              f"{p['sample_tokens']:.1f} | {100 * p['well_formed']:.0f}% |", flush=True)
    trained = [rows[n] for n in spec.sequence]
    print(f"\ntrained families: mean answer {statistics.mean(p['answer_tokens'] for p in trained):.1f}"
          f" tokens, mean teacher accuracy "
          f"{100 * statistics.mean(p['teacher_accuracy'] for p in trained):.1f}%, smallest lift "
          f"{100 * min(p['lift'] for p in trained):+.1f} points; {time.time() - t0:.0f}s")
    return rows


if __name__ == "__main__":
    main()
