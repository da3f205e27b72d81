"""eval_forgetting.py: continual-learning metrics, method comparison tables and plots.

    python eval_forgetting.py runs/quick                 # report.md + plots into the run folder
    python eval_forgetting.py runs/a runs/b --out cmp    # compare several runs

R[k][j] is the accuracy on task j after stage k; row 0 is the base model. `trained` lists the
columns of the trained tasks in training order (task trained[i] is learnt at stage i + 1); the
other columns are held-out probes. ACC, BWT and FWT as in GEM (Lopez-Paz & Ranzato 2017); the
forgetting measure of Chaudhry et al. (2018).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


# ================================================================================================
# Metrics (pure functions)
# ================================================================================================

def summarize(R, trained) -> dict:
    """ACC, BWT, forgetting, FWT and plasticity of one accuracy matrix. Metrics that need two or
    more tasks are None for a single-task sequence."""
    N = len(trained)
    col = lambda i: trained[i]                                   # column of the i-th task
    final = R[N]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {
        "acc": mean([final[col(i)] for i in range(N)]),
        # BWT: final accuracy minus the accuracy right after the task was learnt
        "bwt": mean([final[col(i)] - R[i + 1][col(i)] for i in range(N - 1)]),
        # forgetting: best accuracy at any stage from its own until the one before last, minus final
        "forgetting": mean([max(R[k][col(i)] for k in range(i + 1, N)) - final[col(i)]
                            for i in range(N - 1)]),
        # FWT: what earlier stages did for a task before it was trained, versus the base
        "fwt": mean([R[i][col(i)] - R[0][col(i)] for i in range(1, N)]),
        # plasticity: what each stage taught its own task
        "plasticity": mean([R[i + 1][col(i)] - R[i][col(i)] for i in range(N)]),
    }


def relative_change(R) -> tuple:
    """The unit of the paper's figures: 100 * (R[k][j] - R[0][j]) / R[0][j]. Where the base
    accuracy is 0 the relative change is undefined; those cells hold the absolute change in
    points instead and are listed in the second return value."""
    absolute = [j for j, r0 in enumerate(R[0]) if r0 == 0]
    rel = [[100 * (r - r0) / r0 if r0 else 100 * (r - r0) for r, r0 in zip(row, R[0])]
           for row in R]
    return rel, absolute


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (0 for a single value), ignoring None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# Student's t quantile t(0.975, df) for two-sided 95% intervals; between entries the smaller df
# (a wider interval) is used.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile(df: int) -> float:
    return T_975[max(k for k in T_975 if k <= df)]


def paired_difference(a, b) -> dict:
    """Mean of a[i] - b[i] over paired runs (the same seed: the same base evaluation and the
    same training prompts) with a 95% t interval. With one pair there is no interval."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"n": 0, "mean": None, "low": None, "high": None}
    m, sd = mean_std(d)
    if len(d) < 2:
        return {"n": 1, "mean": m, "low": None, "high": None}
    half = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "mean": m, "low": m - half, "high": m + half}


def verdict(diff) -> str:
    """'beyond noise' when the 95% interval excludes 0, 'within noise' when it contains 0."""
    if diff["low"] is None:
        return "no interval (one seed)"
    return "beyond noise" if diff["low"] > 0 or diff["high"] < 0 else "within noise"


# ================================================================================================
# Reading run folders and comparing methods
# ================================================================================================

def load_results(folder) -> dict:
    """A run folder's results.json; a missing, damaged or foreign file is one clear error."""
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"run folder {str(folder)!r} has no readable results.json "
                         f"({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged or truncated ({e}); run the same run_sequence.py "
                         f"command again to rewrite it from the finished stages") from None
    if not isinstance(results, dict) or not {"tasks", "trained", "runs"} <= set(results):
        raise ValueError(f"{path} is not a results file of run_sequence.py (it lacks tasks, "
                         f"trained or runs)")
    return results


def method_values(results, run) -> dict:
    """Every summary metric and measure of one finished run (one method, one seed)."""
    R, records, trained = run["R"], run["records"], results["trained"]
    probes = [j for j in range(len(results["tasks"])) if j not in trained]
    values = summarize(R, trained)
    values["ood"] = (sum(R[-1][j] - R[0][j] for j in probes) / len(probes) if probes else None)
    last = records[-1]
    values["param_drift"] = last["param_drift"]["overall"]
    values["response_kl"] = last["response_kl"]
    values["repetition"] = last["artifacts"]["repetition_frac"]
    return values


def method_rows(results) -> dict:
    """Per method, per-seed values of every summary metric and measure after the last stage."""
    rows = {}
    for method, seeds in results["runs"].items():
        per = {}
        for run in seeds.values():
            if len(run["R"]) != len(results["trained"]) + 1:
                continue                                     # an unfinished run
            for key, v in method_values(results, run).items():
                per.setdefault(key, []).append(v)
        if per:
            rows[method] = per
    return rows


COLUMNS = [("acc", "ACC", 100), ("bwt", "BWT", 100), ("forgetting", "Forgetting", 100),
           ("fwt", "FWT", 100), ("plasticity", "Plasticity", 100), ("ood", "OOD Δ", 100),
           ("param_drift", "Param drift %", 100), ("response_kl", "Response KL", 1),
           ("repetition", "Repetition %", 100)]


def comparison_table(results) -> str:
    """A markdown table: one row per method, mean ± std over seeds, accuracies in points."""
    rows = method_rows(results)
    head = "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, per in rows.items():
        cells = []
        for key, _, scale in COLUMNS:
            m, s = mean_std(per[key])
            digits = 3 if scale == 1 else 1
            cells.append("n/a" if m is None
                         else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}")
        lines.append(f"| {method} | {len(per['acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED = [("acc", "ACC"), ("forgetting", "Forgetting"), ("bwt", "BWT"),
          ("plasticity", "Plasticity"), ("ood", "OOD Δ")]


def paired_rows(results, baseline) -> dict:
    """Per method other than `baseline`: the paired difference (method - baseline) of each
    summary metric over the seeds both finished."""
    per_seed = {}
    for method, seeds in results["runs"].items():
        for seed, run in seeds.items():
            if len(run["R"]) == len(results["trained"]) + 1:
                per_seed.setdefault(method, {})[seed] = method_values(results, run)
    out = {}
    for method, by_seed in per_seed.items():
        if method == baseline or baseline not in per_seed:
            continue
        common = sorted(set(by_seed) & set(per_seed[baseline]))
        out[method] = {key: paired_difference([by_seed[s][key] for s in common],
                                               [per_seed[baseline][s][key] for s in common])
                       for key, _ in PAIRED}
    return out


def paired_table(results, baseline="grpo") -> str:
    """Method minus baseline, per metric: mean over paired seeds [95% interval], in points, and
    one plain sentence per method on forgetting and ACC."""
    rows = paired_rows(results, baseline)
    if not rows:
        return ""
    lines = [f"| method − {baseline} | seeds | " + " | ".join(c[1] for c in PAIRED) + " |",
             "|" + "---|" * (len(PAIRED) + 2)]
    sentences = []
    for method, diffs in rows.items():
        cells = []
        for key, _ in PAIRED:
            d = diffs[key]
            cells.append("n/a" if d["mean"] is None else f"{100 * d['mean']:+.1f}" + (
                "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"))
        lines.append(f"| {method} | {diffs['acc']['n']} | " + " | ".join(cells) + " |")
        f, a = diffs["forgetting"], diffs["acc"]
        if f["mean"] is not None and a["mean"] is not None:
            sentences.append(
                f"{method} forgets {100 * f['mean']:+.1f} points more than {baseline} "
                f"({verdict(f)}) and ends with an ACC {100 * a['mean']:+.1f} points higher "
                f"({verdict(a)}), over {f['n']} paired seed{'s' * (f['n'] != 1)}.")
    return "\n".join(lines) + "\n\n" + "\n".join(sentences)


def accuracy_table(results, method) -> str:
    """Accuracy of every task after every stage (mean over seeds), in points."""
    tasks, trained = results["tasks"], results["trained"]
    runs = [r for r in results["runs"][method].values() if r["R"]]
    n_rows = min(len(r["R"]) for r in runs)
    names = [f"{t}{'' if j in trained else ' (probe)'}" for j, t in enumerate(tasks)]
    lines = ["| after stage | " + " | ".join(names) + " |", "|" + "---|" * (len(tasks) + 1)]
    for k in range(n_rows):
        label = "base" if k == 0 else f"{k}: {tasks[trained[k - 1]]}"
        cells = [f"{100 * mean_std([r['R'][k][j] for r in runs])[0]:.1f}"
                 + (f" ± {100 * runs[0]['SE'][k][j]:.1f}" if len(runs) == 1 and "SE" in runs[0]
                    else "") for j in range(len(tasks))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relative_table(results, method) -> str:
    """The paper's unit: % change of each task's accuracy versus the base model, per stage
    (mean over seeds of the per-seed relative change)."""
    tasks = results["tasks"]
    runs = [r for r in results["runs"][method].values() if r["R"]]
    n_rows = min(len(r["R"]) for r in runs)
    rel = [relative_change(r["R"][:n_rows]) for r in runs]
    absolute = sorted({j for _, cols in rel for j in cols})
    lines = ["| after stage | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for k in range(1, n_rows):
        cells = [f"{mean_std([r[0][k][j] for r in rel])[0]:+.0f}"
                 + ("*" if j in absolute else "") for j in range(len(tasks))]
        lines.append(f"| {k}: {tasks[results['trained'][k - 1]]} | " + " | ".join(cells) + " |")
    if absolute:
        lines.append("\n\\* base accuracy 0: absolute change in points instead of %")
    return "\n".join(lines)


def write_report(results, out: Path) -> str:
    """report.md with the comparison, per-method accuracy tables, and the plots beside it."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = results.get("config", {})
    trained_names = [results["tasks"][j] for j in results["trained"]]
    probe_names = [t for j, t in enumerate(results["tasks"]) if j not in results["trained"]]
    parts = [f"# Report: {results.get('name', out.name)}", "",
             f"Tasks in training order: {', '.join(trained_names)}; "
             f"held-out probes: {', '.join(probe_names) or 'none'}. "
             f"Model: {cfg.get('model', '?')}; steps per task: {cfg.get('steps', '?')}; "
             f"evaluation: {cfg.get('eval_mode', 'greedy')}.", "",
             "Accuracies and their differences are in points (0-100); mean ± std over seeds. "
             "BWT < 0 and Forgetting > 0 mean forgetting; OOD Δ is the final minus base "
             "accuracy on the held-out probes; Response KL is KL(base || model) per token on the "
             "base model's own evaluation answers.", "", comparison_table(results), ""]
    paired = paired_table(results)
    if paired:
        parts += ["Paired differences against GRPO (the same seeds: the same base evaluation and "
                  "the same training prompts), mean [95% t interval] in points:", "", paired, ""]
    for method in results["runs"]:
        if any(r["R"] for r in results["runs"][method].values()):
            parts += [f"## {method}", "", "Accuracy (points):", "",
                      accuracy_table(results, method), "",
                      "Relative change versus the base model (%, the unit of the paper's "
                      "figures):", "", relative_table(results, method), ""]
    plots = write_plots(results, out)
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(parts) + "\n"
    tmp = out / f"report.md.tmp{os.getpid()}"       # atomic, as every write of a run
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    return text


def write_plots(results, out: Path) -> list:
    """accuracy.png: each task's accuracy over stages per method (the paper's main figure);
    drift.png: parameter drift and response KL over stages."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, trained = results["tasks"], results["trained"]
    methods = [m for m in results["runs"] if any(r["R"] for r in results["runs"][m].values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        for m in methods:
            runs = [r for r in results["runs"][m].values() if r["R"]]
            n = min(len(r["R"]) for r in runs)
            stats = [mean_std([100 * r["R"][k][j] for r in runs]) for k in range(n)]
            mu, sd = [s[0] for s in stats], [s[1] for s in stats]
            ax.plot(range(n), mu, marker="o", label=m)
            ax.fill_between(range(n), [a - b for a, b in zip(mu, sd)],
                            [a + b for a, b in zip(mu, sd)], alpha=0.2)
        trained_at = trained.index(j) + 1 if j in trained else None
        if trained_at:
            ax.axvline(trained_at, color="grey", ls=":", lw=1)
        ax.set_title(tasks[j] + ("" if trained_at else " (probe)"))
        ax.set_xlabel("stage")
        ax.set_ylim(-2, 102)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "accuracy.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for m in methods:
        runs = [r for r in results["runs"][m].values() if r["records"]]
        n = min(len(r["records"]) for r in runs)
        for ax, get in ((axes[0], lambda rec: 100 * rec["param_drift"]["overall"]),
                        (axes[1], lambda rec: rec["response_kl"])):
            ax.plot(range(n), [mean_std([get(r["records"][k]) for r in runs])[0]
                               for k in range(n)], marker="o", label=m)
    axes[0].set_title("parameter drift ||θ-θ0||/||θ0|| (%)")
    axes[1].set_title("response KL(base || model) per token")
    for ax in axes:
        ax.set_xlabel("stage")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "drift.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


def merge(results_list) -> dict:
    """Several run folders as one comparison: methods are prefixed by the run name if they
    clash."""
    merged = dict(results_list[0], runs={})
    for res in results_list:
        if res["tasks"] != merged["tasks"] or res["trained"] != merged["trained"]:
            raise ValueError(f"run {res.get('name')!r} has tasks {res['tasks']}, expected "
                             f"{merged['tasks']}: only runs over the same tasks can be compared")
        for method, seeds in res["runs"].items():
            key = method if method not in merged["runs"] else f"{res.get('name')}/{method}"
            merged["runs"][key] = seeds
    return merged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (each with a results.json)")
    ap.add_argument("--out", help="where report.md and the plots go (default: the first run)")
    args = ap.parse_args(argv)
    try:
        results = merge([load_results(f) for f in args.runs])
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out or args.runs[0])
    write_report(results, out)
    print(comparison_table(results))
    print(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
