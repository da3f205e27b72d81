"""eval_forgetting.py: continual-learning metrics, comparisons with intervals, reports and plots,
from run folders alone: it reads results.json and never loads a model (what needs a model, such
as drift, distances or the signal check, ran in the run, and its numbers are in the folder).

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
from pathlib import Path

from harness.files import atomic_write

PAPER_DRIFT = ("nss", "max_angle", "pm_overlap", "pm_update")   # a record's paper_drift keys


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


# Student's t quantiles t(0.975, df) (two-sided 95% intervals) and t(0.8, df) (80% power); between
# entries the smaller df (a wider interval, a larger detectable difference) is used.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889,
        9: 0.883, 10: 0.879, 12: 0.873, 15: 0.866, 20: 0.860, 30: 0.854, 60: 0.848, 120: 0.845}


def t_quantile(df: int, table=T_975) -> float:
    return table[max(k for k in table if k <= df)]


def detectable_difference(sd, n) -> float | None:
    """The smallest true paired difference that n seeds detect (a 95% interval excluding 0) with
    80% power, given the paired differences' standard deviation sd: (t(0.975, n - 1) +
    t(0.8, n - 1)) sd / sqrt(n). None below two seeds."""
    if n < 2:
        return None
    return (t_quantile(n - 1) + t_quantile(n - 1, T_80)) * sd / math.sqrt(n)


def paired_difference(a, b) -> dict:
    """Mean of a[i] - b[i] over paired runs (the same seed: the same base evaluation and the
    same training prompts) with a 95% t interval and the difference its seeds could detect
    (detectable_difference). With one pair there is neither."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"n": 0, "mean": None, "low": None, "high": None, "detectable": None}
    m, sd = mean_std(d)
    if len(d) < 2:
        return {"n": 1, "mean": m, "low": None, "high": None, "detectable": None}
    half = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "mean": m, "low": m - half, "high": m + half,
            "detectable": detectable_difference(sd, len(d))}


def interval_text(diff, scale=1.0, digits=1, power=False) -> str:
    """A paired difference as text: '+1.2 [-0.3, +2.7]', with power its detectable difference
    too ('+1.2 [-0.3, +2.7] (detects 4.1)'); the mean alone with one pair, n/a without any."""
    if diff["mean"] is None:
        return "n/a"
    text = f"{scale * diff['mean']:+.{digits}f}"
    if diff["low"] is None:
        return text
    text += f" [{scale * diff['low']:+.{digits}f}, {scale * diff['high']:+.{digits}f}]"
    return text + (f" (detects {abs(scale) * diff['detectable']:.{digits}f})" if power else "")


def verdict(diff, scale=100.0, unit="points") -> str:
    """'beyond noise' when the 95% interval excludes 0; when it holds 0, 'not detected (would
    detect >= X points)', X the difference its seeds detect with 80% power."""
    if diff["low"] is None:
        return "one seed, no interval"
    if diff["low"] > 0 or diff["high"] < 0:
        return "beyond noise"
    return f"not detected (would detect >= {abs(scale) * diff['detectable']:.1f} {unit})"


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
    for method, seeds in results["runs"].items():
        for seed, run in seeds.items():
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                       for row in run.get("R", []) for v in row):
                raise ValueError(f"{path}: {method} seed {seed} has an accuracy that is not a "
                                 f"number in [0, 1] in its R matrix")
    return results


def method_values(results, run) -> dict:
    """Every summary metric and measure of one finished run (one method, one seed)."""
    R, records, trained = run["R"], run["records"], results["trained"]
    probes = [j for j in range(len(results["tasks"])) if j not in trained]
    values = summarize(R, trained)
    values["ood"] = (sum(R[-1][j] - R[0][j] for j in probes) / len(probes) if probes else None)
    last = records[-1]
    values["param_drift"] = last["param_drift"]["overall"]
    values["angle"] = last["param_drift"].get("subspace_angle")
    values["response_kl"] = last["response_kl"]
    values["similarity"] = last.get("response_similarity")
    values.update(last.get("paper_drift") or dict.fromkeys(PAPER_DRIFT))
    values["repetition"] = last["artifacts"]["repetition_frac"]
    leaks = [v for rec in records[1:] for v in rec.get("train", {}).get("series", {}).get(
        "leak_rate", []) if v is not None]
    values["leak"] = sum(leaks) / len(leaks) if leaks else None
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
           ("param_drift", "Param drift %", 100), ("angle", "Angle °", 1),
           ("response_kl", "Response KL", 1), ("similarity", "Similarity", 1),
           ("repetition", "Repetition %", 100), ("nss", "NSS ×1e3", 1000),
           ("max_angle", "Max angle °", 1), ("pm_overlap", "PM overlap %", 100),
           ("pm_update", "PM update %", 100), ("leak", "Leaks %", 100)]


def mean_cell(values, scale, digits) -> str:
    """A table cell: the mean over seeds, ± their std with several seeds; "–" when the run did
    not measure it (e.g. no code task: no leaks)."""
    m, sd = mean_std(values)
    if m is None:
        return "–"
    several = sum(v is not None for v in values) > 1
    return f"{m * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if several else "")


def summary_table(results, baseline="grpo") -> str:
    """The end-of-run summary, at most 100 columns: per method its seeds, ACC, forgetting,
    plasticity, parameter drift and response KL (mean, and ± std with several seeds), then each
    method's forgetting and ACC minus `baseline`'s (with several seeds: [95% interval] and what
    they detect). The full tables are in report.md."""
    rows = method_rows(results)
    keys = ("acc", "forgetting", "plasticity", "param_drift", "response_kl")
    lines = ["| method | seeds | " + " | ".join(LABEL[k] for k in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    for method, per in rows.items():
        cells = [mean_cell(per[key], SCALE[key], 3 if key == "response_kl" else 1)
                 for key in keys]
        lines.append(f"| {method} | {len(per['acc'])} | " + " | ".join(cells) + " |")
    paired = paired_rows(results, baseline, [("forgetting", ""), ("acc", "")])
    for method, diffs in paired.items():
        lines.append(f"{method} − {baseline}: forgetting "
                     f"{interval_text(diffs['forgetting'], 100, power=True)}, ACC "
                     f"{interval_text(diffs['acc'], 100, power=True)} (points)")
    return "\n".join(lines)


def cautions(results) -> list:
    """What a run cannot show, said plainly: a stage whose learning rate was 0 at every batch
    (no update: the warm-up gives batch 0 a rate of 0), and an own-stage gain smaller than its
    standard error (sqrt(SE before^2 + SE after^2) over the test prompts: evaluation noise)."""
    out = []
    for method, seeds in results["runs"].items():
        for seed, run in seeds.items():
            for k, j in enumerate(results["trained"][:len(run["R"]) - 1], 1):
                task = results["tasks"][j]
                lrs = run["records"][k].get("train", {}).get("series", {}).get("lr")
                if lrs and not any(lrs):
                    out.append(f"{method} seed {seed}, stage {k} ({task}): no update (its "
                               f"learning rate was 0 at every batch; the warm-up's first batch "
                               f"gets 0)")
                gain = run["R"][k][j] - run["R"][k - 1][j]
                se = math.sqrt(run["SE"][k][j] ** 2 + run["SE"][k - 1][j] ** 2) if "SE" in run \
                    else 0.0
                if abs(gain) < se:
                    out.append(f"{method} seed {seed}, stage {k} ({task}): its gain "
                               f"{100 * gain:+.1f} is within its standard error "
                               f"({100 * se:.1f}): evaluation noise, not learning")
    return out


def comparison_table(results) -> str:
    """A markdown table: one row per method, mean ± std over seeds (mean_cell), accuracies in
    points."""
    rows = method_rows(results)
    head = "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, per in rows.items():
        cells = [mean_cell(per[key], scale, 3 if key == "response_kl" else 1)
                 for key, _, scale in COLUMNS]
        lines.append(f"| {method} | {len(per['acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SCALE = {key: scale for key, _, scale in COLUMNS}
LABEL = {key: label for key, label, _ in COLUMNS}
PAIRED = [(key, LABEL[key]) for key in ("acc", "forgetting", "bwt", "plasticity", "ood")]
PAIRED_DRIFT = [(key, LABEL[key]) for key in ("param_drift", "angle", "response_kl",
                                              "similarity", *PAPER_DRIFT)]


def paired_rows(results, baseline, metrics=PAIRED) -> dict:
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
                       for key, _ in metrics}
    return out


def paired_table(results, baseline="grpo", metrics=PAIRED) -> str:
    """Method minus baseline, per metric: mean over paired seeds [95% interval] (accuracies and
    drift in points, KL and similarity as they are), and one plain sentence per method on
    forgetting and ACC."""
    rows = paired_rows(results, baseline, metrics)
    if not rows:
        return ""
    lines = [f"| method − {baseline} | seeds | " + " | ".join(c[1] for c in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    sentences = []
    for method, diffs in rows.items():
        cells = []
        for key, _ in metrics:
            cells.append(interval_text(diffs[key], SCALE[key], 3 if key == "response_kl" else 1,
                                       power=True))
        lines.append(f"| {method} | {diffs[metrics[0][0]]['n']} | " + " | ".join(cells) + " |")
        f, a = diffs.get("forgetting"), diffs.get("acc")
        said = []
        if f and f["mean"] is not None:
            said.append(f"forgets {abs(100 * f['mean']):.1f} points "
                        f"{'more' if f['mean'] > 0 else 'less'} than {baseline} ({verdict(f)})")
        if a and a["mean"] is not None:
            said.append(f"ends with an ACC {abs(100 * a['mean']):.1f} points "
                        f"{'higher' if a['mean'] > 0 else 'lower'} ({verdict(a)})")
        if said:
            n = diffs[metrics[0][0]]["n"]
            sentences.append(f"{method} " + " and ".join(said)
                             + f", over {n} paired seed{'s' * (n != 1)}.")
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


def drift_path(results, run, k) -> list:
    """Stage k of a run as (in-domain gain since the stage began, drift from the base) points:
    the stage's start, its learning-curve points, its end; drift = relative L2 and the paper's
    four measures. Stage-end records written before the paper's measures existed give None."""
    task = results["tasks"][results["trained"][k - 1]]
    R, records = run["R"], run["records"]

    def drift(rec):
        d = rec.get("paper_drift")
        return d and {"param_drift": rec["param_drift"]["overall"], **d}
    start = R[k - 1][results["trained"][k - 1]]
    points = [(0.0, drift(records[k - 1]))]
    points += [(c["accuracy"][task] - start, drift(c)) for c in records[k].get("curve", [])]
    return points + [(R[k][results["trained"][k - 1]] - start, drift(records[k]))]


def at_gain(points, gain, key):
    """`key`'s drift where the path first reaches in-domain gain `gain` (linear between its
    points), or None if it never does."""
    for (g0, d0), (g1, d1) in zip(points, points[1:]):
        if d0 is None or d1 is None:
            return None
        if g1 >= gain > g0 or g1 == gain:
            w = 1.0 if g1 == g0 else (gain - g0) / (g1 - g0)
            return d0[key] + w * (d1[key] - d0[key])
    return None


MATCHED = ("param_drift", *PAPER_DRIFT)


def matched_gain_table(results, baseline="grpo") -> str:
    """Drift at matched in-domain gain, stage by stage: each run's drift where its own stage gain
    first reaches g*, the smallest final stage gain of any finished run (so every run reaches
    it), mean over seeds, and each method minus `baseline` over paired seeds [95% interval]."""
    runs = {m: {s: r for s, r in seeds.items() if len(r["R"]) == len(results["trained"]) + 1}
            for m, seeds in results["runs"].items()}
    lines = ["| stage | g* (points) | method | " + " | ".join(LABEL[k] for k in MATCHED) + " |",
             "|" + "---|" * (len(MATCHED) + 3)]
    for k in range(1, len(results["trained"]) + 1):
        paths = {m: {s: drift_path(results, r, k) for s, r in seeds.items()}
                 for m, seeds in runs.items() if seeds}
        g_star = min((p[-1][0] for seeds in paths.values() for p in seeds.values()), default=0)
        if g_star <= 0:
            continue
        values = {m: {s: {key: at_gain(p, g_star, key) for key in MATCHED}
                      for s, p in seeds.items()} for m, seeds in paths.items()}
        for m, seeds in values.items():
            cells = []
            for key in MATCHED:
                mean, _ = mean_std([v[key] for v in seeds.values()])
                if mean is None:
                    cells.append("n/a")
                    continue
                cell = f"{SCALE[key] * mean:.2f}"
                if m != baseline and baseline in values:
                    common = sorted(set(seeds) & set(values[baseline]))
                    d = paired_difference([seeds[s][key] for s in common],
                                          [values[baseline][s][key] for s in common])
                    if d["low"] is not None:
                        cell += f" ({interval_text(d, SCALE[key], 2, power=True)})"
                cells.append(cell)
            lines.append(f"| {k} {results['tasks'][results['trained'][k - 1]]} | "
                         f"{100 * g_star:.1f} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def forgetting_path(results, run, k) -> list:
    """Stage k >= 2 of a run as (in-domain gain since the stage began, the mean drop of the
    earlier trained tasks since then) points: the stage's start, its learning-curve points, its
    end. A stage without curve points gives its start and end only."""
    tasks, trained, R = results["tasks"], results["trained"], run["R"]
    own, earlier = trained[k - 1], trained[:k - 1]
    start = R[k - 1]
    drop = lambda acc: sum(start[j] - acc[j] for j in earlier) / len(earlier)   # noqa: E731
    points = [(0.0, 0.0)]
    for c in run["records"][k].get("curve", []):
        acc = [c["accuracy"][t] for t in tasks]
        points.append((acc[own] - start[own], drop(acc)))
    return points + [(R[k][own] - start[own], drop(R[k]))]


def matched_forgetting_table(results, baseline="grpo") -> str:
    """Forgetting at matched in-domain gain, stage by stage from the second: each run's drop of
    the earlier tasks where its own gain on the stage's task first reaches g*, the smallest
    final stage gain of any finished run (linear between the evaluations), mean over seeds, and
    each method minus `baseline` paired over seeds [95% interval] (what it detects): so that
    "forgets less" cannot just mean "learned less"."""
    runs = {m: {s: r for s, r in seeds.items() if len(r["R"]) == len(results["trained"]) + 1}
            for m, seeds in results["runs"].items()}
    runs = {m: seeds for m, seeds in runs.items() if seeds}
    lines = ["| stage | g* (points) | method | drop of the earlier tasks at g* (points) |"
             + (f" − {baseline} |" if baseline in runs else ""), "|---|---|---|---|"
             + ("---|" if baseline in runs else "")]
    for k in range(2, len(results["trained"]) + 1):
        paths = {m: {s: forgetting_path(results, r, k) for s, r in seeds.items()}
                 for m, seeds in runs.items()}
        g_star = min((p[-1][0] for seeds in paths.values() for p in seeds.values()), default=0)
        if g_star <= 0:
            continue
        at = {m: {s: at_gain([(g, {"drop": d}) for g, d in p], g_star, "drop")
                  for s, p in seeds.items()} for m, seeds in paths.items()}
        for m, seeds in at.items():
            mean, _ = mean_std(list(seeds.values()))
            cells = ["n/a" if mean is None else f"{100 * mean:+.1f}"]
            if baseline in at:
                common = sorted(set(seeds) & set(at[baseline]))
                cells.append("" if m == baseline else interval_text(paired_difference(
                    [seeds[s] for s in common], [at[baseline][s] for s in common]), 100,
                    power=True))
            lines.append(f"| {k} {results['tasks'][results['trained'][k - 1]]} | "
                         f"{100 * g_star:.1f} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ood_pairs(results, distances, method, relative=False) -> list:
    """Every (trained task, evaluated task) pair of a method's finished runs: (trained,
    evaluated, MMD, {seed: change}), change = the evaluated set's accuracy after the trained
    task's stage minus before it (a gain if > 0, forgetting if < 0); with `relative`, in % of
    the base model's accuracy on that set (the unit of the paper's figures; in points where the
    base's accuracy is 0)."""
    runs = {s: r for s, r in results["runs"][method].items()
            if len(r["R"]) == len(results["trained"]) + 1}
    pairs = []
    for k, j in enumerate(results["trained"], 1):
        a = results["tasks"][j]
        for e, b in enumerate(results["tasks"]):
            unit = lambda r: (r["R"][0][e] or 1.0) if relative else 1.0      # noqa: E731
            pairs.append((a, b, distances[a][b], {s: (r["R"][k][e] - r["R"][k - 1][e]) / unit(r)
                                                  for s, r in runs.items()}))
    return pairs


def floored(pairs, sign) -> list:
    """The pairs with each seed's change floored at 0 from one side, as the paper's two panels
    show them: gain (sign +1: max(0, change)) or forgetting (sign -1: max(0, -change))."""
    return [(a, b, d, {s: max(0.0, sign * c) for s, c in change.items()})
            for a, b, d, change in pairs]


BINS = ("near", "intermediate", "far")


def shared_seeds(pairs) -> list:
    """The seeds every pair has a change for (the runs of the method that finished)."""
    return sorted(set.intersection(*(set(p[3]) for p in pairs))) if pairs else []


def distance_bins(pairs) -> dict:
    """The pairs other than a task with itself, split by distance into terciles."""
    others = sorted((p for p in pairs if p[0] != p[1]), key=lambda p: p[2])
    cut = [round(len(others) * i / 3) for i in range(4)]
    return {name: others[cut[i]:cut[i + 1]] for i, name in enumerate(BINS)}


def bin_means(pairs) -> dict:
    """{tercile: [its mean value per seed]} over the seeds every pair has; {} when a tercile is
    empty or no run finished."""
    bins, seeds = distance_bins(pairs), shared_seeds([p for p in pairs if p[0] != p[1]])
    if not seeds or not all(bins.values()):
        return {}
    return {name: [sum(p[3][s] for p in b) / len(b) for s in seeds] for name, b in bins.items()}


def ood_peak(pairs) -> dict:
    """The paper's reading tested on `pairs` whose values are forgetting (floored: >= 0): the
    pairs other than a task with itself split into distance terciles; a peak at intermediate
    distance is the intermediate tercile's mean forgetting above both the near and the far
    one's, each a paired difference over seeds with a 95% t interval."""
    means, none = bin_means(pairs), paired_difference([], [])
    if not means:
        return {"bins": {}, "above_near": none, "above_far": none}
    bins = distance_bins(pairs)
    return {"bins": {name: (b[0][2], b[-1][2], mean_std(means[name])[0])
                     for name, b in bins.items()},
            "above_near": paired_difference(means["intermediate"], means["near"]),
            "above_far": paired_difference(means["intermediate"], means["far"])}


def peak_reading(near, far) -> str:
    """A peak at intermediate distance: above both the near and the far tercile beyond noise;
    "no" where it is below either beyond noise; else not detected, with the larger of the two
    differences the seeds could detect."""
    if near["low"] is None or far["low"] is None:
        return "n/a"
    if near["low"] > 0 and far["low"] > 0:
        return "yes, beyond noise"
    if near["high"] < 0 or far["high"] < 0:
        return "no"
    return (f"not detected (would detect >= "
            f"{100 * max(near['detectable'], far['detectable']):.1f})")


def ood_table(results, distances, baseline=None) -> str:
    """Per method: each distance tercile's MMD range and mean forgetting (floored at 0, in % of
    the base's accuracy on the set), how far the intermediate one's exceeds the near and the
    far one's, whether that is a peak, and the intermediate tercile's forgetting against
    `baseline`'s, paired over seeds."""
    forgetting = {m: floored(ood_pairs(results, distances, m, relative=True), -1)
                  for m in results["runs"] if finished_runs(results, m)}
    versus = baseline if baseline in forgetting else None
    lines = ["| method | " + " | ".join(f"forgetting %, {b} (MMD)" for b in BINS)
             + " | intermediate − near | intermediate − far | a peak at intermediate? |"
             + (f" intermediate: − {versus} |" if versus else ""),
             "|" + "---|" * (7 + bool(versus))]
    for method, pairs in forgetting.items():
        got = ood_peak(pairs)
        cells = [f"{100 * f:.1f} ({lo:.3f}-{hi:.3f})" for lo, hi, f in got["bins"].values()
                 ] or ["n/a (fewer than 3 pairs)"] * len(BINS)
        near, far = got["above_near"], got["above_far"]
        cells += [interval_text(near, 100, power=True), interval_text(far, 100, power=True),
                  peak_reading(near, far)]
        if versus:
            mine, theirs = bin_means(pairs), bin_means(forgetting[versus])
            cells.append("" if method == versus or not mine or not theirs else interval_text(
                paired_difference(mine["intermediate"], theirs["intermediate"]), 100, power=True))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quadratic_fit(xs, ys, grid) -> tuple:
    """The least-squares parabola y = b0 + b1 x + b2 x^2 through (xs, ys), at each x of `grid`,
    with its pointwise 95% confidence band (b's covariance s^2 (X^T X)^-1, Student's t at
    n - 3 degrees of freedom): (fit, low, high), lists over the grid. With fewer than 4 points,
    no band (low = high = fit)."""
    import numpy as np
    x, y, g = np.asarray(xs, float), np.asarray(ys, float), np.asarray(grid, float)
    design = np.stack([np.ones_like(x), x, x * x], 1)                     # [n, 3]
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    at = np.stack([np.ones_like(g), g, g * g], 1)                         # [G, 3]
    fit = at @ beta
    if len(x) < 4:
        return fit.tolist(), fit.tolist(), fit.tolist()
    s2 = float(((y - design @ beta) ** 2).sum()) / (len(x) - 3)
    cov = s2 * np.linalg.pinv(design.T @ design)
    half = t_quantile(len(x) - 3) * np.sqrt(np.einsum("gi,ij,gj->g", at, cov, at))
    return fit.tolist(), (fit - half).tolist(), (fit + half).tolist()


RELATIONS = ("both", "content", "format", "neither")


def relation(results, trained: str, evaluated: str) -> str | None:
    """What an evaluated set shares with a trained family (its content: what is asked; its
    format: the final answer's wrapper), as the run recorded it (harness/lab_families.py): both,
    the content only, the format only, or neither; None where the run knows none (a set that is
    no lab family)."""
    return results.get("relations", {}).get(trained, {}).get(evaluated)


def forgetting_by_relation(results, pairs) -> dict:
    """{relation: {seed: forgetting}}: the mean forgetting (minus the change) over the pairs of
    each relation, a task with itself left out; {} unless every pair has a relation."""
    others = [p for p in pairs if p[0] != p[1]]
    if not others or any(relation(results, a, b) is None for a, b, _, _ in others):
        return {}
    seeds = shared_seeds(others)
    out = {}
    for rel in RELATIONS:
        group = [p for p in others if relation(results, p[0], p[1]) == rel]
        if group and seeds:
            out[rel] = {s: -sum(p[3][s] for p in group) / len(group) for s in seeds}
    return out


def paired_by_seed(a: dict, b: dict) -> dict:
    """paired_difference of two {seed: value} on the seeds they share."""
    seeds = sorted(set(a) & set(b))
    return paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


def relation_table(results, distances, baseline="grpo") -> str:
    """The ladder's reading: per method, the forgetting of the sets that share a trained
    family's content, its format, both or neither, and the partly related ones' excess over the
    unrelated ones [95% interval over seeds]; then each method against `baseline`, per relation,
    paired on their shared seeds. Empty when a set is not one of the lab's families."""
    got = {m: forgetting_by_relation(results, ood_pairs(results, distances, m))
           for m in results["runs"] if finished_runs(results, m)}
    got = {m: g for m, g in got.items() if g}
    if not got:
        return ""
    rels = [r for r in RELATIONS if all(r in g for g in got.values())]
    lines = ["| method | " + " | ".join(f"forgetting, shares {r}" for r in rels)
             + " | content − neither | format − neither |", "|" + "---|" * (len(rels) + 3)]
    for m, g in got.items():
        cells = [f"{100 * mean_std(list(g[r].values()))[0]:+.1f}" for r in rels]
        cells += [interval_text(paired_by_seed(g[r], g["neither"]), 100, power=True)
                  if r in g and "neither" in g else "n/a" for r in ("content", "format")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in got:
        if m != baseline and baseline in got:
            cells = [interval_text(paired_by_seed(got[m][r], got[baseline][r]), 100, power=True)
                     for r in rels]
            lines.append(f"| {m} − {baseline} | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


DOSE_METRICS = ("forgetting", "plasticity", "acc", "response_kl", *PAPER_DRIFT, "leak")


def dose_rows(results, baseline="grpo") -> list:
    """The dose finding's reading: per SDPO method of the run, (kind, dose p, its teacher's
    measured departure and foreign-wrapper share on the base, averaged over the trained tasks,
    {metric: paired difference against `baseline`}), dose 0 (plain SDPO) first in each kind."""
    doses, paired = results.get("doses", {}), paired_rows(results, baseline, [
        (key, LABEL[key]) for key in DOSE_METRICS])
    rows = []
    for kind in ("content", "format"):
        for method, (k, share) in sorted(doses.items(), key=lambda item: item[1][1]):
            if (k == kind or share == 0) and method in paired:
                seen = list(results.get("departure", {}).get(method, {}).values())
                mean = lambda key: (sum(d[key] for d in seen) / len(seen)            # noqa: E731
                                    if seen and all(d[key] is not None for d in seen) else None)
                rows.append((kind, share, method, mean("departure"), mean("foreign"),
                             paired[method]))
    return rows


def dose_boundary(rows) -> dict:
    """Per kind, the smallest dose at which SDPO's forgetting exceeds the baseline's beyond noise
    (its 95% interval above 0), or None: the lab's boundary for the paper's mechanism."""
    out = {}
    for kind in ("content", "format"):
        beyond = [share for k, share, _, _, _, d in rows if k == kind
                  and d["forgetting"]["low"] is not None and d["forgetting"]["low"] > 0]
        out[kind] = min(beyond) if beyond else None
    return out


def dose_table(results, baseline="grpo") -> str:
    """One row per (kind, dose): the teacher's measured departure and foreign-wrapper share,
    and each metric's difference against `baseline`, paired over seeds [95% interval] (the
    difference its seeds detect)."""
    rows = dose_rows(results, baseline)
    if not rows:
        return ""
    lines = ["| kind | dose p | method | teacher departure % | foreign wrapper % | "
             + " | ".join(f"{LABEL[k]} − {baseline}" for k in DOSE_METRICS) + " |",
             "|" + "---|" * (5 + len(DOSE_METRICS))]
    for kind, share, method, departure, foreign, diffs in rows:
        seen = [("n/a" if v is None else f"{100 * v:.1f}") for v in (departure, foreign)]
        cells = [interval_text(diffs[k], SCALE[k], 3 if k == "response_kl" else 1, power=True)
                 for k in DOSE_METRICS]
        lines.append(f"| {kind} | {share:g} | {method} | " + " | ".join(seen + cells) + " |")
    return "\n".join(lines)


def fixed_margins(fig, left=0.65, right=0.15, top=0.5, bottom=0.5, gap=0.7):
    """Room in inches around one row of panels for their titles, tick and axis labels.
    tight_layout finds the same room by drawing the figure once more: half of a small run's
    plotting time."""
    width, height = fig.get_size_inches()
    n = max(len(fig.axes), 1)
    panel = (width - left - right - (n - 1) * gap) / n
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap / panel)


def dose_plot(results, out: Path, baseline="grpo") -> Path:
    """dose.png: SDPO's forgetting minus the baseline's, with its 95% interval, against the dose
    p of each kind of misleading demonstration (0: plain SDPO)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = dose_rows(results, baseline)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, kind in enumerate(("content", "format")):
        points = [(share, d["forgetting"]) for k, share, _, _, _, d in rows if k == kind]
        xs = [x + (0.01 if i else -0.01) for x, _ in points]
        ys = [100 * d["mean"] for _, d in points]
        low = [100 * (d["mean"] - d["low"]) if d["low"] is not None else 0 for _, d in points]
        high = [100 * (d["high"] - d["mean"]) if d["low"] is not None else 0 for _, d in points]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=kind, color=f"C{i}")
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("dose p: share of teacher contexts with a misleading demonstration")
    ax.set_ylabel(f"forgetting, SDPO − {baseline} (points)")
    ax.legend(fontsize=8, title="misleading", title_fontsize=8)
    fixed_margins(fig, top=0.2)                 # no title
    fig.savefig(out / "dose.png", dpi=90)
    plt.close(fig)
    return out / "dose.png"


def write_report(results, out: Path, baselines=None, finding=None) -> str:
    """report.md with the signal check, the comparison and its paired differences against each
    of `baselines` that ran (default: the finding's, else grpo), the section of the finding the
    run checks (results["finding"]: its name, what the paper says, what to look at; or the one
    named by `finding`), per-method tables, and the plots."""
    stored = results.get("finding") or {}
    finding = stored if finding in (None, stored.get("name")) else {"name": finding}
    baselines = baselines or (finding or {}).get("baselines", ("grpo",))
    out.mkdir(parents=True, exist_ok=True)
    cfg = results.get("config", {})
    trained_names = [results["tasks"][j] for j in results["trained"]]
    probe_names = [t for j, t in enumerate(results["tasks"]) if j not in results["trained"]]
    parts = [f"# Report: {results.get('name', out.name)}", "",
             f"Tasks in training order: {', '.join(trained_names)}; "
             f"held-out probes: {', '.join(probe_names) or 'none'}. "
             f"Model: {cfg.get('model', '?')}; steps per task: {cfg.get('steps', '?')}; "
             f"evaluation: {cfg.get('eval_mode', 'sample')}.", ""]
    if results.get("signal"):
        parts += ["Signal check before training (the base model): " + "; ".join(
            f"{name}: reward {v['reward']:.2f} at the training temperature, "
            f"{100 * v['solved_groups']:.0f}% of groups with a success, "
            f"{100 * v['zero_adv_groups']:.0f}% all alike, teacher lift "
            f"{100 * v['teacher_lift']:+.0f} points"
            + "".join(f" (WARNING: {w})" for w in v["warnings"])
            for name, v in results["signal"].items()) + ".", ""]
    if cautions(results):
        parts += ["What this run cannot show:", ""] + [f"- {c}" for c in cautions(results)] + [""]
    parts += ["Every number is defined, with its formula and which way is better, in the "
              "project's glossary (docs/glossary.md).", ""]
    parts += ["Accuracies and their differences are in points (0-100); mean ± std over seeds. "
              "BWT < 0 and Forgetting > 0 mean forgetting; OOD Δ is the final minus base "
              "accuracy on the held-out probes; Angle is the mean principal angle between the top "
              "singular subspaces of each attention and MLP weight matrix before and after; "
              "Response KL is KL(base || model) per token on the base model's own evaluation "
              "answers; Similarity is how alike (0-100) the answers are to the base model's.", "",
              comparison_table(results), ""]
    for baseline in baselines:
        paired = paired_table(results, baseline)
        if paired:
            parts += [f"Paired differences against {baseline} (the same seeds: the same base "
                      "evaluation and the same training prompts), mean [95% t interval]:", "",
                      paired, "", paired_table(results, baseline, PAIRED_DRIFT), ""]
    unfinished = [f"{m} seed {s}" for m, seeds in results["runs"].items()
                  for s, r in seeds.items() if len(r["R"]) != len(results["trained"]) + 1]
    if unfinished:
        parts += ["Not finished, so left out of the comparisons: " + ", ".join(unfinished)
                  + " (run the same command again to finish them).", ""]
    plots = write_plots(results, out)
    if finding:
        parts += [f"## Finding: {finding['name']}", ""]
        if "paper" in finding:
            parts += [f"The paper: {finding['paper']}. Look at {finding['look']}.", ""]
        parts += [f"![{p.stem}]({p.name})" for p in plots if p.stem in FINDING_FIGURES.get(
            finding["name"], ())] + [""]
        if "razor" in FINDING_FIGURES.get(finding["name"], ()) and razor_sentence(results):
            parts += [razor_sentence(results), ""]
        if finding["name"] == "ood" and not results.get("distances"):
            parts += ["This run folder holds no distances between its sets (distances.json, "
                      "which run_sequence.py writes): rerun the same command to add them.", ""]
        elif finding["name"] == "ood":
            distances = results["distances"]
            plots.append(ood_plot(results, distances, out))
            embedded = results.get("distances_from") or "the base model itself"
            parts += ["![ood](ood.png)", "", "As the paper's forgetting_curve.jpg: every (trained "
                      "task, evaluated set) pair at the MMD (RBF kernel, one bandwidth for all "
                      "pairs) between the training set and the evaluation set, embedded by "
                      f"{embedded} (mean last hidden state over prompt and gold answer); its "
                      "gain and its forgetting during the trained task's stage, each floored at "
                      "0 and in % of the base model's accuracy on the set (the paper's unit), "
                      "mean over seeds; a quadratic least-squares fit per method with its 95% "
                      "confidence band. The paper's reading, tested: forgetting by distance "
                      "tercile (the pairs of a task with itself left out), the intermediate "
                      "tercile's excess over the near and the far one, paired over seeds [95% "
                      "interval] (a peak: above both, beyond noise), and the intermediate "
                      f"tercile against {baselines[0]}:", "",
                      ood_table(results, distances, baselines[0]), ""]
            by_relation = relation_table(results, distances, baselines[0])
            if by_relation:
                parts += ["The same pairs by what the evaluated set shares with the trained "
                          "family (the ladder: its content, its format, both or neither), "
                          "forgetting in points, mean over seeds [95% interval over seeds]:", "",
                          by_relation, ""]
        if finding["name"] == "dose" and dose_table(results, baselines[0]):
            plots.append(dose_plot(results, out, baselines[0]))
            boundary = dose_boundary(dose_rows(results, baselines[0]))
            parts += ["![dose](dose.png)", "", "Each dose of misleading demonstrations (of "
                      "another prompt of the task: content; of another task, in its wrapper: "
                      "format; harness/dose.py), the teacher's departure from a right answer on "
                      "the base model at that dose (the share of tokens where its most likely "
                      "token is not the student's own, and the share of samples whose teacher "
                      "carries another task's wrapper), and SDPO at that dose minus "
                      f"{baselines[0]}, paired over seeds [95% interval] (the difference its "
                      "seeds detect):", "", dose_table(results, baselines[0]), "",
                      "The smallest dose at which SDPO forgets more than "
                      f"{baselines[0]} beyond noise: " + "; ".join(
                          f"{kind} {'none of those run' if p is None else f'p = {p:g}'}"
                          for kind, p in boundary.items()) + ".", ""]
        if finding["name"] in ("drift", "continual") and matched_forgetting_table(results):
            parts += ["Forgetting at matched in-domain gain: for each stage from the second, "
                      "each run's drop of the earlier tasks (since the stage began) where its "
                      "gain on the stage's own task first reaches g*, the smallest final stage "
                      "gain of any run (linear between the evaluations every few batches; a "
                      "stage evaluated only at its ends reads the straight line between them); "
                      f"mean over seeds, and each method − {baselines[0]} [95% interval] (the "
                      "difference its seeds detect):", "",
                      matched_forgetting_table(results, baselines[0]), ""]
        if finding["name"] == "drift" and matched_gain_table(results):
            parts += ["Drift at matched in-domain gain: each run's drift where its gain on the "
                      "stage's own task first reaches g*, the smallest final stage gain of any "
                      "run (linear between the evaluations every few batches); drift is measured "
                      "from the base, so a later stage carries the earlier ones. Mean over "
                      f"seeds, and (method − {baselines[0]} [95% interval]):", "",
                      matched_gain_table(results, baselines[0]), ""]
    for method in results["runs"]:
        if any(r["R"] for r in results["runs"][method].values()):
            parts += [f"## {method}", "", "Accuracy (points):", "",
                      accuracy_table(results, method), "",
                      "Relative change versus the base model (%, the unit of the paper's "
                      "figures):", "", relative_table(results, method), ""]
    shown = FINDING_FIGURES.get(finding["name"], ()) if finding else ()
    rest = [p for p in plots if p.stem not in shown]
    if rest:
        parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in rest]
    text = "\n".join(parts) + "\n"
    atomic_write(out / "report.md", text)
    return text


FINDING_FIGURES = {"teacher-stability": ("curves",), "ood": (), "cot": ("curves",),
                   "continual": ("accuracy", "razor"), "drift": ("paper_drift", "drift", "razor"),
                   "collapse": ("collapse",), "dose": ("accuracy",)}


def finished_runs(results, method) -> list:
    return [r for r in results["runs"][method].values() if r["R"]]


def forgetting_so_far(R, trained, k) -> float | None:
    """After stage k: the mean over the tasks trained before k of their best accuracy since
    their own stage minus the accuracy now (the forgetting measure, stage by stage)."""
    drops = [max(R[i][trained[j]] for i in range(j + 1, k)) - R[k][trained[j]]
             for j in range(k - 1)]
    return sum(drops) / len(drops) if drops else None


def razor_points(results, method) -> list:
    """(response KL to the base, forgetting so far in points) after every stage k >= 2 of every
    finished run of `method`: the points of RL's Razor (arXiv 2509.04259)."""
    return [(r["records"][k]["response_kl"], 100 * forgetting_so_far(r["R"], results["trained"], k))
            for r in finished_runs(results, method) for k in range(2, len(r["R"]))]


def pearson(xs, ys) -> dict:
    """Pearson's r with a 95% interval (Fisher's z), n the number of points."""
    n = len(xs)
    if n < 4:
        return {"r": None, "low": None, "high": None, "n": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return {"r": None, "low": None, "high": None, "n": n}
    r = max(-0.999999, min(0.999999, sxy / math.sqrt(sxx * syy)))
    z, half = math.atanh(r), 1.959964 / math.sqrt(n - 3)
    return {"r": r, "low": math.tanh(z - half), "high": math.tanh(z + half), "n": n}


def razor_sentence(results) -> str:
    """Pearson's r of response KL against forgetting so far, over all methods' points."""
    points = [p for m in results["runs"] for p in razor_points(results, m)]
    c = pearson([x for x, _ in points], [y for _, y in points]) if points else None
    if not c or c["r"] is None:
        return ""
    return (f"Response KL against forgetting so far, after every stage from the second on, every "
            f"run of every method: Pearson r = {c['r']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] "
            f"over {c['n']} points (later stages have both more drift and more to forget).")


def mean_curve(runs, get) -> tuple:
    """Mean and std over runs of get(run) -> list of (x, y), on the x of the first run."""
    series = [get(r) for r in runs]
    xs = [x for x, _ in series[0]]
    stats = [mean_std([s[i][1] for s in series if i < len(s)]) for i in range(len(xs))]
    return xs, [m for m, _ in stats], [sd for _, sd in stats]


def write_plots(results, out: Path) -> list:
    """accuracy.png: each task's accuracy over stages per method (the paper's main figure);
    drift.png: parameter drift, principal angle, response KL and similarity over stages;
    razor.png: response KL against forgetting, stage by stage, every run (RL's Razor);
    curves.png: accuracy during the stages, where they were evaluated every few batches;
    collapse.png: the artifact rates, whether the teacher feeds them, and the reward at every
    training step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, trained = results["tasks"], results["trained"]
    methods = [m for m in results["runs"] if finished_runs(results, m)]
    steps = results.get("config", {}).get("steps") or [0] * len(trained)
    offsets = [sum(steps[:k]) for k in range(len(trained) + 1)]
    paths = []

    def save(fig, name):
        fixed_margins(fig)
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        paths.append(out / name)

    colour = {m: f"C{i}" for i, m in enumerate(methods)}   # a method's colour in every panel

    def band(ax, xs, mu, sd, label, marker="o"):
        nan = float("nan")       # no value at a point (e.g. no malformed sample): a gap
        mu, sd = [nan if v is None else v for v in mu], [nan if v is None else v for v in sd]
        ax.plot(xs, mu, marker=marker, ms=3, label=label, color=colour.get(label))
        ax.fill_between(xs, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                        alpha=0.2, color=colour.get(label))

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        for m in methods:
            runs = finished_runs(results, m)
            n = min(len(r["R"]) for r in runs)
            band(ax, *mean_curve(runs, lambda r: [(k, 100 * r["R"][k][j]) for k in range(n)]), m)
        trained_at = trained.index(j) + 1 if j in trained else None
        if trained_at:
            ax.axvline(trained_at, color="grey", ls=":", lw=1)
        ax.set_title(tasks[j] + ("" if trained_at else " (probe)"))
        ax.set_xlabel("stage")
        ax.set_ylim(-2, 102)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    save(fig, "accuracy.png")

    measures = [("parameter drift ||θ-θ0||/||θ0|| (%)", lambda rec: 100 * rec["param_drift"][
                    "overall"]),
                ("principal angle of the weights (°)",
                 lambda rec: rec["param_drift"].get("subspace_angle", 0.0)),
                ("response KL(base || model) per token", lambda rec: rec["response_kl"]),
                ("similarity to the base's answers", lambda rec: rec.get("response_similarity",
                                                                         100.0))]
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3))
    for m in methods:
        runs = finished_runs(results, m)
        n = min(len(r["records"]) for r in runs)
        for ax, (_, get) in zip(axes, measures):
            band(ax, *mean_curve(runs, lambda r: [(k, get(r["records"][k])) for k in range(n)]),
                 m)
    for ax, (title, _) in zip(axes, measures):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stage")
    axes[-1].legend(fontsize=7)
    save(fig, "drift.png")

    def drift_series(r, key, scale):   # (global batch, measure) at curve points and stage ends
        points = [(0, 0.0 if key != "pm_overlap" else scale)]
        for k, rec in enumerate(r["records"][1:], 1):
            points += [(offsets[k - 1] + c["step"], scale * c["paper_drift"][key])
                       for c in rec.get("curve", []) if "paper_drift" in c]
            if rec.get("paper_drift") and points[-1][0] != offsets[k]:
                points.append((offsets[k], scale * rec["paper_drift"][key]))
        return points

    panels = [("nss", "NSS (×1e3)", 1000), ("max_angle", "largest principal angle (°)", 1),
              ("pm_overlap", "principal-mask overlap (%)", 100),
              ("pm_update", "principal-mask update (%)", 100)]
    if all(r["records"][-1].get("paper_drift") for m in methods for r in finished_runs(results, m)):
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
        for m in methods:
            for ax, (key, _, scale) in zip(axes, panels):
                band(ax, *mean_curve(finished_runs(results, m),
                                     lambda r: drift_series(r, key, scale)), m)
        for ax, (_, title, _) in zip(axes, panels):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("rollout batches")
            for x in offsets[1:-1]:
                ax.axvline(x, color="grey", ls=":", lw=1)
        axes[-1].legend(fontsize=7)
        save(fig, "paper_drift.png")

    if len(trained) > 1:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for m in methods:
            points = razor_points(results, m)
            if points:
                ax.scatter(*zip(*points), s=14, label=m)
        ax.set_xlabel("response KL to the base after the stage")
        ax.set_ylabel("forgetting so far (points)")
        ax.set_title("RL's Razor: response drift vs forgetting", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "razor.png")

    def curve(r, j):   # (global step, accuracy) of task j: stage ends and points within stages
        points = [(0, 100 * r["R"][0][j])]
        for k, rec in enumerate(r["records"][1:], 1):
            points += [(offsets[k - 1] + c["step"], 100 * c["accuracy"][tasks[j]])
                       for c in rec.get("curve", [])]
            if not rec.get("curve") or rec["curve"][-1]["step"] != steps[k - 1]:
                points.append((offsets[k], 100 * r["R"][k][j]))
        return points

    if any(rec.get("curve") for m in methods for r in finished_runs(results, m)
           for rec in r["records"]):
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3), squeeze=False)
        for j, ax in enumerate(axes[0]):
            for m in methods:
                band(ax, *mean_curve(finished_runs(results, m), lambda r: curve(r, j)), m)
            ax.set_title(tasks[j] + ("" if j in trained else " (probe)"))
            ax.set_xlabel("rollout batches")
            ax.set_ylim(-2, 102)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][-1].legend(fontsize=7)
        save(fig, "curves.png")

    def series(r, key, scale):
        values = [(offsets[k - 1] + i, v) for k, rec in enumerate(r["records"][1:], 1)
                  for i, v in enumerate(rec["train"].get("series", {}).get(key, []))]
        return [(x, None if v is None else scale * v) for x, v in values]

    keys = [("leak_rate", "samples with another family's wrapper (%)", 100),
            ("malformed_rate", "samples out of the task's format (%)", 100),
            ("artifact_gap", "log p_teacher - log p_student,\nmalformed samples' tokens", 1),
            ("repetition_rate", "samples with a repeated n-gram (%)", 100),
            ("unfinished_rate", "samples without an end (%)", 100),
            ("reward", "reward (%)", 100)]
    has_series = all(r["records"][-1].get("train", {}).get("series") for m in methods
                     for r in finished_runs(results, m))
    sampled = {m: [r for r in finished_runs(results, m)   # SFT samples nothing: no series
                   if r["records"][-1]["train"]["series"].get("reward")[0] is not None]
               for m in methods} if has_series else {}
    if any(sampled.values()):
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        for m, runs in sampled.items():
            for ax, (key, _, scale) in zip(axes, keys):
                if runs and any(v is not None for r in runs for rec in r["records"][1:]
                                for v in rec["train"]["series"].get(key, [])):
                    band(ax, *mean_curve(runs, lambda r: series(r, key, scale)), m, marker=None)
        for ax, (_, title, _) in zip(axes, keys):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("rollout batches")
        axes[-1].legend(fontsize=7)
        save(fig, "collapse.png")
    return paths


def ood_plot(results, distances, out: Path) -> Path:
    """ood.png, the paper's forgetting_curve.jpg: every (trained task, evaluated set) pair at its
    MMD from the training set, its gain and its forgetting (each floored at 0, in % of the
    base's accuracy on the set, mean over seeds) in two panels, one colour per method and one
    marker per trained task, with each method's quadratic fit and its 95% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = dict(zip((results["tasks"][j] for j in results["trained"]), "oxs+^vD*"))
    methods = [m for m in results["runs"] if finished_runs(results, m)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, sign, title in ((axes[0], 1, "gain (%)"), (axes[1], -1, "forgetting (%)")):
        for i, method in enumerate(methods):
            pairs = floored(ood_pairs(results, distances, method, relative=True), sign)
            xs = [d for _, _, d, _ in pairs]
            ys = [100 * mean_std(list(v.values()))[0] for _, _, _, v in pairs]
            for (a, _, d, _), y in zip(pairs, ys):
                ax.scatter(d, y, marker=markers.get(a, "o"), s=22, color=f"C{i}", alpha=0.75)
            grid = [min(xs) + (max(xs) - min(xs)) * t / 50 for t in range(51)]
            fit, low, high = quadratic_fit(xs, ys, grid)
            ax.plot(grid, fit, ls="--", color=f"C{i}", label=method)
            ax.fill_between(grid, low, high, color=f"C{i}", alpha=0.15)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("MMD (RBF) between training and evaluation set")
        ax.set_ylabel(title)
    for task, marker in markers.items():
        axes[1].scatter([], [], marker=marker, color="grey", label=f"trained on {task}")
    axes[1].legend(fontsize=7, ncol=2)
    fixed_margins(fig, top=0.2)                 # no title
    fig.savefig(out / "ood.png", dpi=90)
    plt.close(fig)
    return out / "ood.png"


def merge(results_list) -> dict:
    """Several run folders as one comparison: methods are prefixed by the run name if they
    clash."""
    merged = dict(results_list[0], runs={})
    for res in results_list:
        if res["tasks"] != merged["tasks"] or res["trained"] != merged["trained"]:
            raise ValueError(f"run {res.get('name')!r} has tasks {res['tasks']}, expected "
                             f"{merged['tasks']}: only runs over the same tasks can be compared")
        steps = res.get("config", {}).get("steps")
        if steps != merged.get("config", {}).get("steps"):
            raise ValueError(f"run {res.get('name')!r} has steps {steps}, expected "
                             f"{merged['config'].get('steps')}: runs with other stage lengths "
                             f"had other budgets and cannot share one comparison")
        for method, seeds in res["runs"].items():
            key = method if method not in merged["runs"] else f"{res.get('name')}/{method}"
            merged["runs"][key] = seeds
    return merged


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (each with a results.json)")
    ap.add_argument("--out", help="where report.md and the plots go (default: the first run)")
    ap.add_argument("--finding", choices=list(FINDING_FIGURES), help="write this finding's "
                    "section (default: the one the run was started for, if any)")
    ap.add_argument("--baselines", help="comma-separated methods to pair every other method "
                    "against (default grpo, or the finding's), e.g. grpo,sdpo")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if len(args.runs) > 1 and not args.out:
        ap.error("several run folders: give --out, a folder for the comparison (the first "
                 "run's own report is not overwritten)")
    try:
        results = merge([load_results(f) for f in args.runs])
    except ValueError as e:
        ap.error(str(e))
    default = ",".join((results.get("finding") or {}).get("baselines", ("grpo",)))
    baselines = [b for b in (args.baselines or default).split(",") if b]
    unknown = [b for b in baselines if b not in results["runs"]]
    if unknown:
        ap.error(f"--baselines {','.join(baselines)!r}: {unknown} did not run here; the methods "
                 f"are {', '.join(results['runs'])}")
    out = Path(args.out or args.runs[0])
    write_report(results, out, baselines, args.finding)
    print(comparison_table(results))
    print(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
