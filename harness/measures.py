"""The measures a run takes besides accuracy, which need the model: they run in the run, and
their numbers go into the run folder (eval_forgetting.py only reads them).

- the signal check before training: what each method will have to learn from;
- the teacher's departure from right answers (where a self-teacher misleads);
- drift: parameter drift, the paper's four parameter measures, response KL and similarity;
- distances between task sets (MMD on embeddings), for the out-of-domain finding;
- format artifacts at every step: wrapper leaks, malformed answers, the teacher's pull;
- Measures: all of them plugged into sdpo_cl.continual_sequence as its Hooks.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
import weakref
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import sdpo_cl as sc
from harness import lora
from harness.lab_families import WRAPPERS


# ---- The signal before training: what each method will have to learn from -----------------------

@torch.no_grad()
def rollout_signal(model, tokenizer, task, cfg, n_prompts=None) -> dict:
    """What GRPO and SDPO will have to learn from, before any training: on n_prompts training
    prompts (by default one rollout batch, prompts_per_step, so the check costs what one step's
    sampling does), G samples each at the training temperature, the mean reward, the share of
    groups with at least one success (SDPO's demonstrations) and of groups whose rewards are all
    equal (no GRPO advantage)."""
    n_prompts = n_prompts or cfg.prompts_per_step
    examples = [task.train[i] for i in range(min(n_prompts, len(task.train)))]
    _, _, rewards = sc.sample_rollout(model, tokenizer, task, examples, cfg)
    groups = rewards.view(-1, cfg.group_size)
    return {"reward": rewards.mean().item(),
            "solved_groups": (groups.max(1).values >= cfg.success_reward_threshold
                              ).float().mean().item(),
            "zero_adv_groups": (groups.std(1) == 0).float().mean().item()}


def signal_warnings(signal) -> list:
    """Plain warnings where a method will have almost no signal to learn from."""
    warnings = []
    if signal["solved_groups"] < 0.1:
        warnings.append("fewer than 10% of groups have a success: SDPO will have almost no "
                        "demonstration")
    if signal["zero_adv_groups"] > 0.9:
        warnings.append("more than 90% of groups score all alike: GRPO will have almost no "
                        "advantage")
    if signal["teacher_lift"] < 0.05:
        warnings.append("a correct demonstration barely helps: the self-teacher has little to add")
    return warnings


def signal_check(model, tokenizer, task, cfg, teacher_lift=None, n_prompts=None) -> dict:
    """Before training: rollout_signal, the teacher lift (the test accuracy with a correct
    demonstration in the prompt minus without; measured here unless given, e.g. from row 0), and
    the warnings."""
    if teacher_lift is None:
        plain = sc.task_accuracy(model, tokenizer, task, cfg)["accuracy"]
        teacher_lift = sc.task_accuracy(model, tokenizer, task, cfg,
                                     with_demonstration=True)["accuracy"] - plain
    signal = {**rollout_signal(model, tokenizer, task, cfg, n_prompts),
              "teacher_lift": teacher_lift}
    return {**signal, "warnings": signal_warnings(signal)}


@torch.no_grad()
def teacher_departure(model, tokenizer, task, cfg, n_prompts=32, wrappers=WRAPPERS) -> dict:
    """Where the self-teacher pulls away from a right answer, in a unit any model has: on
    n_prompts training prompts, G samples each at the training temperature, every right sample
    that has a teacher context (chosen as in training: a right sibling as its demonstration, or
    with cfg.misleading_share a misleading one, harness/dose.py) is scored by the model in that
    context. `departure`: the share of its answer tokens where the teacher's most likely token is
    not the student's own (right) token; `foreign`: the share of those samples whose teacher's
    most likely tokens, read as text, carry another task's wrapper (`wrappers`: {task name:
    its marker}; the task's own is not counted); `same_path`: the share whose demonstration is
    word for word the sample's own answer (where no departure is to be expected)."""
    examples = [task.train[i] for i in range(min(n_prompts, len(task.train)))]
    rollout, samples, rewards = sc.sample_rollout(model, tokenizer, task, examples, cfg)
    misleading = [ex.get("misleading_" + cfg.misleading_kind) for ex in samples]
    contexts = sc.teacher_contexts([ex["prompt"] for ex in samples], rollout.completions,
                                   rewards.tolist(), [None] * len(samples), cfg.group_size, cfg,
                                   misleading)
    rows = [i for i, c in enumerate(contexts)
            if c is not None and rewards[i] >= cfg.success_reward_threshold]
    if not rows:
        return {"departure": None, "foreign": None, "same_path": None, "scored": 0}
    texts = [sc.format_prompt(tokenizer, contexts[i]) for i in rows]
    prompt_ids, prompt_mask = sc.tokenize_prompts(tokenizer, texts, model.device)
    ids, mask = rollout.response_ids[rows], rollout.response_mask[rows]
    top = sc.response_scores(model, prompt_ids, prompt_mask, ids, mask).argmax(-1)   # [R, T]
    departed = ((top != ids).float() * mask).sum() / mask.sum()
    read = [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(top, mask)]
    others = [marker for name, marker in (wrappers or {}).items() if name != task.name]
    foreign = sum(any(marker in text for marker in others) for text in read) / len(rows)
    own = [rollout.completions[i] for i in rows]
    if cfg.remove_thinking_from_demonstration:         # as teacher_contexts shows a demonstration
        own = [sc.strip_thinking(c) for c in own]
    same = sum(contexts[i] == sc.teacher_prompt(samples[i]["prompt"], cfg, c)   # its own answer
               for i, c in zip(rows, own))
    return {"departure": departed.item(), "foreign": foreign, "same_path": same / len(rows),
            "scored": len(rows)}


# ---- Drift: how far a stage moved the model, in parameters and in responses ---------------------

def layer_type(name: str) -> str:
    for key, kind in (("embed", "embedding"), ("lm_head", "embedding"), ("attn", "attention"),
                      ("mlp", "mlp"), ("norm", "norm")):
        if key in name:
            return kind
    return "other"


@dataclass
class Decomposition:
    """A matrix's float64 SVD, its top k triplets kept (and every singular value), with the hash
    of the content it was computed from and the principal masks built from it."""
    digest: bytes
    k: int
    u: torch.Tensor                               # [m, k]
    s: torch.Tensor                               # [min(m, n)]
    vh: torch.Tensor                              # [k, n]
    masks: dict = field(default_factory=dict)     # (rank, alpha) -> [m, n] bool


_SVDS = {}   # id(matrix) -> its Decomposition, while the matrix lives


@torch.no_grad()
def decomposition(w, k) -> Decomposition:
    """W's decomposition, (re)computed when its content changed (a hash of its bytes: optimizers
    change weights in place without a trace): a run's base matrices are decomposed once, and the
    model's once per measurement, not once per measure (five and four times before)."""
    digest = hashlib.blake2b(w.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()
    seen = _SVDS.get(id(w))
    if seen is None or seen.digest != digest or seen.k < k:
        if seen is None:
            weakref.finalize(w, _SVDS.pop, id(w), None)
        u, sv, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        keep = max(k, 64)      # the principal mask's rank: one decomposition serves every measure
        seen = _SVDS[id(w)] = Decomposition(digest, keep, u[:, :keep].clone(), sv,
                                             vh[:keep].clone())
    return seen


def top_svd(w, k):
    """The top-k singular triplets of W in float64: U [m, k], all of S, Vh [k, n]."""
    d = decomposition(w, k)
    return d.u[:, :k], d.s, d.vh[:k]


@torch.no_grad()
def principal_angles(w0, w, k, side="left"):
    """[k] principal angles (degrees) between the top-k left (U: the directions the matrix
    writes to) or right (V: those it reads from) singular subspaces of a weight matrix before
    (w0) and after (w): the arccos of the singular values of U0^T U (Bjorck & Golub), 0 where
    training kept a direction, 90 where it replaced it."""
    # float64: arccos is steep near 1, and float32 rounding alone reads as 0.02 degrees
    pick = (lambda d: d[0]) if side == "left" else (lambda d: d[2].T)
    a, b = pick(top_svd(w0, k)), pick(top_svd(w, k))                      # [m or n, k]
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)                  # [k]
    return torch.rad2deg(torch.arccos(cosines))


def subspace_angle(w0, w, fraction=0.1) -> float:
    """This project's own drift measure: the mean principal angle (degrees) between the top-k
    left singular subspaces, k = `fraction` of the smaller side (at least 1)."""
    return principal_angles(w0, w, max(1, int(fraction * min(w.shape)))).mean().item()


# The paper's four parameter measures (its cl.model.jpg panels: NSS, Max PA, PM overlap, PM
# update, every 10 steps). The paper cites "The Path Not Taken" (arXiv 2511.08567) for them and its
# code has none; the definitions below follow "On the Geometry of On-Policy Distillation" (arXiv
# 2606.07082, section 3.1 and appendix C.3), which restates that suite: per weight matrix, in
# float64, then averaged over the attention and MLP matrices without weighting. NSS and the
# largest angle are the restatement's formulas; "PM overlap" and "PM update" are this project's
# readings of the paper's panel names, which match no formula there exactly (the restatement's
# own overlap, |M_princ & M_upd| / |M_upd| against a random baseline alpha, would sit near 50%,
# not at the panel's 99%).

PAPER_K = 512          # the restatement's k for the principal angles


def principal_k(shape) -> int:
    """The k of the largest-angle measure: the restatement's 512 where the matrix's smaller side
    is larger, else a tenth of that side (at least 1): a lab matrix is 96 wide, where a
    512-dimensional subspace would be all of it and every angle 0."""
    side = min(shape)
    return PAPER_K if side > PAPER_K else max(1, int(0.1 * side))


def normalised_spectral_shift(w0, w) -> float:
    """NSS (restatement, section 3.1) = ||sigma(W) - sigma(W0)||_2 / ||sigma(W0)||_2 over all
    singular values in descending order, float64: how far the matrix's spectrum moved, whatever
    its singular vectors did."""
    s0, s = top_svd(w0, 1)[1], top_svd(w, 1)[1]
    return ((s - s0).norm() / s0.norm()).item()


def max_principal_angle(w0, w, k=None) -> float:
    """Max PA (restatement, appendix C.3): the largest principal angle (degrees) between the
    top-k singular subspaces of W0 and W, over both the left (U) and the right (V) ones, k =
    principal_k(W's shape) unless given."""
    k = k or principal_k(w.shape)
    return max(principal_angles(w0, w, k, "left").max().item(),
               principal_angles(w0, w, k, "right").max().item())


def principal_mask(w, rank=64, alpha=0.5):
    """[m, n] bool, the principal mask (restatement, C.3): the top `alpha` share of entries, by
    magnitude, of W's rank-`rank` reconstruction U_r S_r V_r^T (the weights the matrix's
    principal directions rest on; r 64, alpha 0.5), as those at or above the k-th largest
    (kthvalue: a third of topk's time). Cached with W's decomposition: the base's masks are
    computed once per run."""
    d = decomposition(w, rank)
    if (rank, alpha) not in d.masks:
        r = min(rank, d.s.numel())
        scores = ((d.u[:, :r] * d.s[:r]) @ d.vh[:r]).abs().flatten()
        keep = max(1, int(alpha * scores.numel()))
        d.masks[(rank, alpha)] = (scores >= scores.kthvalue(scores.numel() - keep + 1).values
                                  ).view(w.shape)
    return d.masks[(rank, alpha)]


def update_mask(w0, w, eta=1e-3):
    """[m, n] bool, the update mask (restatement, C.3): the entries that changed as bf16 sees
    them, |w - w0| > eta max(|w0|, |w|) after casting both to bf16, eta 1e-3 (a change bf16
    cannot represent is no change)."""
    a, b = w0.bfloat16().double(), w.bfloat16().double()
    return (b - a).abs() > eta * torch.maximum(a.abs(), b.abs())


def principal_mask_overlap(w0, w, rank=64, alpha=0.5) -> float:
    """"PM overlap", this project's reading of the panel name: |M_princ(W0) & M_princ(W)| /
    |M_princ(W0)|, the share of W0's principal mask that is still W's (1: the weights the
    principal directions rest on are the same)."""
    m0 = principal_mask(w0, rank, alpha)
    return ((m0 & principal_mask(w, rank, alpha)).sum() / m0.sum()).item()


def principal_mask_update(w0, w, rank=64, alpha=0.5, eta=1e-3) -> float:
    """"PM update", this project's reading of the panel name: |M_princ(W0) & M_upd| /
    |M_princ(W0)|, the share of W0's principal mask that training changed (as bf16 sees it)."""
    m0 = principal_mask(w0, rank, alpha)
    return ((m0 & update_mask(w0, w, eta)).sum() / m0.sum()).item()


PAPER_DRIFT = ("nss", "max_angle", "pm_overlap", "pm_update")


@torch.no_grad()
def paper_drift(model, base) -> dict:
    """The paper's four measures, each averaged over the attention and MLP weight matrices (a
    LoRA policy's as it computes with them: lora.effective_weights), one matrix at a time."""
    measures = dict(zip(PAPER_DRIFT, (normalised_spectral_shift, max_principal_angle,
                                      principal_mask_overlap, principal_mask_update)))
    totals, n = dict.fromkeys(PAPER_DRIFT, 0.0), 0
    pairs = zip(lora.effective_weights(model), lora.effective_weights(base))
    for (name, p), (_, p0) in tqdm(list(pairs), desc="drift", leave=False, disable=None):
        if p.dim() == 2 and layer_type(name) in ("attention", "mlp"):
            n += 1
            for key, f in measures.items():
                totals[key] += f(p0, p)
    return {key: total / n for key, total in totals.items()}


@torch.no_grad()
def parameter_drift(model, base) -> dict:
    """||theta - theta_0|| / ||theta_0||, overall and per layer type (attention, mlp, ...), and
    the mean principal angle between the top singular subspaces of each attention and MLP
    weight matrix before and after ("subspace_angle", degrees; the paper's analysis). A LoRA
    policy's weights are those it computes with: W + (alpha / r) B A (lora.effective_weights)."""
    diff, ref, angles = {}, {}, []
    for (name, p), (_, p0) in zip(lora.effective_weights(model), lora.effective_weights(base)):
        kind = layer_type(name)
        diff[kind] = diff.get(kind, 0.0) + (p.float() - p0.float()).pow(2).sum().item()
        ref[kind] = ref.get(kind, 0.0) + p0.float().pow(2).sum().item()
        if p.dim() == 2 and kind in ("attention", "mlp"):
            angles.append(subspace_angle(p0, p))
    out = {"overall": math.sqrt(sum(diff.values()) / sum(ref.values()))}
    out.update({k: math.sqrt(diff[k] / ref[k]) for k in sorted(diff)})
    out["subspace_angle"] = sum(angles) / len(angles) if angles else 0.0
    return out


@torch.no_grad()
def response_kl(model, base, sequences, batch_size=64) -> float:
    """Mean per-token KL(base || model) on fixed (prompt ids, response ids) pairs: the base
    model's own evaluation responses, so every stage is measured on the same tokens."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = [s for s in sequences[start:start + batch_size] if s[1]]
        if not chunk:
            continue
        prompts, responses = [p for p, _ in chunk], [r for _, r in chunk]
        inputs = [sc.pad_cat(prompts, 0, left=True),
                  sc.pad_cat([[1] * len(p) for p in prompts], 0, left=True),
                  sc.pad_cat(responses, 0), sc.pad_cat([[1.0] * len(r) for r in responses], 0)]
        inputs = [x.to(device) for x in inputs]
        logp = torch.log_softmax(sc.response_scores(model, *inputs).float(), -1)   # [b, T, V]
        logp0 = torch.log_softmax(sc.response_scores(base, *inputs).float(), -1)
        total += (sc.kl_divergence(logp0, logp) * inputs[3]).sum().item()
        count += inputs[3].sum().item()
    return total / max(count, 1)


def response_similarity(completions, base_completions) -> float:
    """Mean similarity (0-100, difflib's ratio of matching characters) of each answer to the base
    model's answer to the same prompt: the paper's response-drift view, 100 = unchanged."""
    ratios = [difflib.SequenceMatcher(None, a, b).ratio()
              for a, b in zip(completions, base_completions)]
    return 100 * sum(ratios) / max(len(ratios), 1)


# ---- Distances between task sets: where the out-of-domain sets lie ------------------------------


def mmd_rbf(x, y, bandwidth=None) -> float:
    """Squared maximum mean discrepancy between two samples of vectors x [n, d] and y [m, d]
    with the RBF kernel exp(-||a - b||^2 / (2 h^2)): 0 for the same distribution, growing as
    they part (the paper's distance between training and evaluation sets, on embeddings). The
    biased estimate (diagonals kept), so it is 0 exactly for a set against itself; h by default
    the median distance between all the points (the median heuristic)."""
    x, y = x.double(), y.double()
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)                                          # [n+m, n+m]
    if bandwidth is None:
        bandwidth = d2[d2 > 0].median().sqrt().item() if (d2 > 0).any() else 1.0
    k = torch.exp(-d2 / (2 * bandwidth ** 2))
    n = len(x)
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).item()


@torch.no_grad()
def set_embeddings(model, tokenizer, rows, batch_size=50) -> torch.Tensor:
    """[n, d]: the model's last hidden state averaged over the tokens of each row's chat prompt
    and gold answer, i.e. what the set asks and what answering it looks like: in the lab a
    family's content lives in its prompts and its format in its answers' wrapper. The model is
    the run's base, or any encoder given with --embedding-model (the paper embeds with a model
    of its own)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [sc.format_prompt(tokenizer, ex["prompt"], ex.get("system")) + ex["answer"]
                 for ex in chunk]
        limit = getattr(model.config, "max_position_embeddings", None)   # long rows: their start
        ids = [tokenizer(t, add_special_tokens=False, truncation=limit is not None,
                         max_length=limit).input_ids for t in texts]
        input_ids = sc.pad_cat(ids, tokenizer.pad_token_id)                    # [b, T]
        mask = sc.pad_cat([[1.0] * len(i) for i in ids], 0.0)                  # [b, T]
        hidden = model(input_ids=input_ids.to(model.device), attention_mask=mask.long().to(
            model.device), output_hidden_states=True).hidden_states[-1].float().cpu()  # [b, T, d]
        out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def task_distances(model, tokenizer, trained, evaluated, n=100) -> dict:
    """{trained task: {evaluated task: MMD}}: each training set (its first n train rows) against
    each evaluation set (its first n test rows) on the model's embeddings (set_embeddings), with
    one RBF bandwidth for every pair, the median distance over all their points, so that the
    distances compare (a bandwidth per pair would rescale each)."""
    rows = lambda data: [data[i] for i in range(min(n, len(data)))]
    bar = tqdm(total=len(trained) + len(evaluated), desc="distances", leave=False, disable=None)
    train, test = {}, {}
    for sets, split, tasks in ((train, "train", trained), (test, "test", evaluated)):
        for t in tasks:
            sets[t.name] = set_embeddings(model, tokenizer, rows(getattr(t, split)))
            bar.update()
    bar.close()
    points = torch.cat([*train.values(), *test.values()]).double()
    h = torch.cdist(points, points).flatten().median().item()   # median over all pairs
    return {a: {b: mmd_rbf(x, y, bandwidth=h) for b, y in test.items()} for a, x in train.items()}


# ---- Format artifacts: the collapse mode of the paper, measured at every step -------------------

def wrapper_leaks(completions, own, wrappers) -> dict:
    """The share of answers that carry another family's wrapper (the paper's artifact: math's
    \\boxed repeated in tool-use answers), by wrapper. wrappers: {family: its marker}; own:
    this family's name, whose marker is not a leak."""
    n = max(len(completions), 1)
    return {family: sum(marker in c for c in completions) / n
            for family, marker in wrappers.items() if family != own}


def format_artifacts(completions, n=3, min_repeats=3) -> dict:
    """How often responses repeat themselves, the collapse mode of the paper: the fraction of
    responses in which some word/symbol n-gram occurs >= min_repeats times, and the n-gram
    repeated in most responses."""
    counts, repetitive = {}, 0
    for text in completions:
        toks = re.findall(r"\w+|[^\w\s]", text)
        grams = {}
        for i in range(len(toks) - n + 1):
            g = " ".join(toks[i:i + n])
            grams[g] = grams.get(g, 0) + 1
        repeated = [g for g, c in grams.items() if c >= min_repeats]
        repetitive += bool(repeated)
        for g in repeated:
            counts[g] = counts.get(g, 0) + 1
    top = max(counts, key=counts.get) if counts else ""
    return {"repetition_frac": repetitive / max(len(completions), 1), "top_repeated": top,
            "top_repeated_frac": counts.get(top, 0) / max(len(completions), 1),
            "mean_chars": sum(map(len, completions)) / max(len(completions), 1)}


def teacher_pull(student_logits, teacher_logits, ids, mask) -> float | None:
    """Mean of log p_teacher(token) - log p_student(token) over the tokens of `mask`: positive
    when the teacher's targets rate the sampled tokens above the student. logits: [B, T, V]
    (already divided by the temperature), ids and mask: [B, T]. None on an empty mask."""
    if mask.sum() == 0:
        return None
    gap = sc.token_logprobs(teacher_logits, ids) - sc.token_logprobs(student_logits, ids)
    return ((gap * mask).sum() / mask.sum()).item()


@torch.no_grad()
def artifact_gap(policy, teacher, rollout, targets, rows, cfg) -> float | None:
    """Does a format artifact feed on itself? The teacher's pull (teacher_pull) on the distilled
    tokens of `rows`, the malformed samples, before the update, at the training temperature."""
    rows = rows[targets.teacher_of[rows] >= 0]
    if len(rows) == 0:
        return None
    ids, mask = rollout.response_ids[rows], rollout.response_mask[rows]
    used, prefix_of = targets.teacher_of[rows].unique(return_inverse=True)
    with sc.autocast_for(cfg, policy):
        student = sc.response_scores(policy, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                     ids, mask)
        teacher_logits = teacher.logits(policy, lambda model: sc.teacher_scores(
            model, targets.teacher_ids[used], targets.teacher_mask[used], prefix_of, ids, mask,
            cfg.share_teacher_prefix))
    return teacher_pull(student.float() / cfg.temperature,
                        teacher_logits.float() / cfg.temperature, ids, targets.distill_mask[rows])


def step_artifacts(policy, teacher, task, rollout, samples, targets, cfg, tokenizer,
                   wrappers=WRAPPERS) -> dict:
    """The collapse measures of one rollout batch: repeated n-grams in the samples and in the
    successful ones (the pool SDPO's demonstrations come from); where the task is one of the
    families in `wrappers`, the share of samples carrying each other family's wrapper
    ("leak_<family>"); with the task's `well_formed`, the share of samples out of its answer
    format and, for SDPO, the teacher's pull on them."""
    success = [c for c, r in zip(rollout.completions, targets.rewards.tolist())
               if r >= cfg.success_reward_threshold]
    eos = torch.tensor(sc.eos_ids(policy, tokenizer), device=rollout.response_ids.device)
    out = {"repetition_rate": format_artifacts(rollout.completions)["repetition_frac"],
           "demo_repetition_rate": format_artifacts(success)["repetition_frac"],
           "unfinished_rate": 1.0 - torch.isin(rollout.response_ids, eos).any(1).float().mean()
           .item()}
    if task.name in wrappers:
        leaks = wrapper_leaks(rollout.completions, task.name, wrappers)
        out.update({f"leak_{family}": share for family, share in leaks.items()})
        foreign = [m for family, m in wrappers.items() if family != task.name]
        out["leak_rate"] = sum(any(m in c for m in foreign) for c in rollout.completions) / max(
            len(rollout.completions), 1)
    if task.well_formed is not None:
        malformed = torch.tensor([not task.well_formed(c, ex) for c, ex in
                                  zip(rollout.completions, samples)])
        out["malformed_rate"] = malformed.float().mean().item()
        if targets.teacher_of is not None:
            out["artifact_gap"] = artifact_gap(policy, teacher, rollout, targets,
                                               malformed.nonzero().squeeze(1), cfg)
    return out


def stage_summary(history, series) -> dict:
    """A stage's training: its seconds per step, and each key of `series` at every step (None
    where a step has none)."""
    seconds = [h["seconds"] for h in history]
    return {"seconds_per_step": sum(seconds) / len(seconds),
            "series": {key: [h.get(key) for h in history] for key in series}}


def stage_measures(policy, base, outputs, base_sequences, tokenizer) -> dict:
    """The measures of one stage's record, from its evaluation outputs (sdpo_cl.accuracy_row):
    repetition in the answers, parameter drift, response KL and similarity to the base's
    answers (base_sequences)."""
    decode = lambda pairs: [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
    return {"artifacts": format_artifacts(outputs["completions"]),
            "param_drift": parameter_drift(policy, base), "paper_drift": paper_drift(policy, base),
            "response_kl": response_kl(policy, base, base_sequences),
            "response_similarity": response_similarity(decode(outputs["sequences"]),
                                                       decode(base_sequences))}


class Measures(sc.Hooks):
    """What sdpo_cl.continual_sequence measures besides accuracy, as its hooks: .step, the
    collapse measures of every rollout batch; .stage, the drift of every stage and its training
    summary, which keeps the `series` per step; .curve, the parameter drift at every learning-
    curve point (the paper's every 10 steps, with eval_every=10). A per-step measure is added
    here: a key of step_artifacts' and its name in `series`."""
    series = ("reward", "distill_frac", "repetition_rate", "demo_repetition_rate",
              "unfinished_rate", "malformed_rate", "artifact_gap", "leak_rate", "lr")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def step(self, policy, teacher, task, rollout, samples, targets, cfg) -> dict:
        return step_artifacts(policy, teacher, task, rollout, samples, targets, cfg,
                              self.tokenizer)

    def stage(self, policy, base, outputs, base_sequences, history) -> dict:
        return {**({"train": stage_summary(history, self.series)} if history else {}),
                **stage_measures(policy, base, outputs, base_sequences, self.tokenizer)}

    def curve(self, policy, base) -> dict:
        return {"param_drift": parameter_drift(policy, base),
                "paper_drift": paper_drift(policy, base)}
