"""The first real-model experiment that fits a CPU: two multiple-choice arithmetic tasks.

    python benchmarks/real_model.py data/real          # writes data/real/{addition,multiplication}
    python benchmarks/real_model.py data/real --probe MODEL.gguf   # and the base model's signal

Both tasks are in the official layout and scored by an official reward, the GPQA one (`"kind":
"gpqa"`: the last standalone letter A-D of the upper-cased answer, feedback/gpqa.py of SDPO-CL).
It is the one official scorer a 135M instruct model reaches with the habits it has: SmolLM2-135M
answers "B. 21" or "The answer is D.", and never writes the `<answer>` tag of the mcq kind
(docs/real-models.md) nor, at temperature 1, a right \\boxed{} for the math kind (0 of 64
answers on one-digit sums). Four options, the right sum or product among three neighbours;
addition of two numbers below 20, then multiplication of two numbers below 13: the same format,
other content, so the second stage can cost the first. The rows are drawn from a fixed seed;
train and test share no question. --probe prints what the signal check measures (one rollout
batch at temperature 1) with the answers' length, without training.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


TASKS = {   # name -> (operator text, its function, the operands' range)
    "addition": ("+", lambda a, b: a + b, range(1, 20)),
    "multiplication": ("times", lambda a, b: a * b, range(2, 13)),
}
INSTRUCTION = "Reply with the letter of the right answer."


def question(a, b, name, rng) -> dict:
    """One row: the result among three other numbers within 6 of it, in a random order."""
    text, result, _ = TASKS[name]
    right = result(a, b)
    options = [right] + rng.sample([x for x in range(max(0, right - 6), right + 7)
                                    if x != right], 3)
    rng.shuffle(options)
    lines = [f"{letter}. {value}" for letter, value in zip("ABCD", options)]
    return {"prompt": f"What is {a} {text} {b}?\n" + "\n".join(lines) + "\n" + INSTRUCTION,
            "answer": "ABCD"[options.index(right)], "kind": "gpqa", "dataset": name}


def task_rows(name: str, seed: int = 0, n_test: int = 64) -> dict:
    """{"train": rows, "test": rows} of one task: every operand pair once, shuffled by `seed`,
    the first n_test for the test split."""
    rng = random.Random(f"{name}-{seed}")
    operands = TASKS[name][2]
    pairs = [(a, b) for a in operands for b in operands]
    rng.shuffle(pairs)
    rows = [question(a, b, name, rng) for a, b in pairs]
    return {"test": rows[:n_test], "train": rows[n_test:]}


def write_tasks(folder) -> list:
    """Write every task as folder/<name>/{train,test}.json (JSON lines); returns the folders."""
    written = []
    for name in TASKS:
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        for split, rows in task_rows(name).items():
            (target / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written.append(target)
    return written


def finished(rollout, model, tokenizer) -> float:
    """The share of answers that ended (an end-of-sequence token) within the budget."""
    import torch
    import sdpo_cl as sc
    eos = torch.tensor(sc.eos_ids(model, tokenizer))
    return torch.isin(rollout.response_ids, eos).any(1).float().mean().item()


def probe(model_path: str, folders, prompts: int = 8, group_size: int = 8,
          max_new_tokens: int = 48):
    """The base model's signal on each task at temperature 1, as the signal check measures it,
    with the answers' length, the share cut by the budget, and the self-teacher's departure
    from a right answer (measures.teacher_departure: where the dose finding's lab teachers lie
    on the same scale, docs/findings.md)."""
    from harness import measures
    from harness.loading import load_policy, load_task
    import sdpo_cl as sc
    model, tokenizer = load_policy(model_path)
    cfg = sc.Config(prompts_per_step=prompts, group_size=group_size,
                    max_new_tokens=max_new_tokens)
    for folder in folders:
        task = load_task(str(folder), model_path)
        t0 = time.time()
        examples = [task.train[i] for i in range(prompts)]
        rollout, _, rewards = sc.sample_rollout(model, tokenizer, task, examples, cfg)
        groups = rewards.view(-1, group_size)
        print(f"{task.name}: reward {rewards.mean():.2f}, groups with a success "
              f"{(groups.max(1).values > 0.5).float().mean():.0%}, all alike "
              f"{(groups.std(1) == 0).float().mean():.0%}, answer length "
              f"{rollout.response_mask.sum(1).mean():.0f} tokens, cut "
              f"{1 - finished(rollout, model, tokenizer):.0%} ({time.time() - t0:.0f} s)")
        print("   e.g. " + repr(rollout.completions[0][-200:]))
        sc.seed_everything("departure", task.name)   # the dose finding's x-axis, for this model
        dep = measures.teacher_departure(model, tokenizer, task, cfg, n_prompts=prompts,
                                         wrappers=None)
        print("   self-teacher: " + ("no right answer with a demonstration to score"
                                     if dep["departure"] is None else
                                     f"departs from a right answer on {dep['departure']:.1%} of "
                                     f"its tokens ({dep['scored']} answers; the demonstration "
                                     f"is the answer itself in {dep['same_path']:.0%})"))


def build_parser():
    """The command line (a test parses every command the docs show)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where to write the task folders")
    parser.add_argument("--probe", metavar="MODEL", help="print a model's signal on them "
                        "and its self-teacher's departure (a hub id, a folder or a GGUF file)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    folders = write_tasks(args.folder)
    print("wrote " + ", ".join(str(f) for f in folders))
    if args.probe:
        probe(args.probe, folders)


if __name__ == "__main__":
    main()
