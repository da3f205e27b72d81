"""Run folders: per-stage checkpoints with manifests (a resume recomputes a damaged stage rather
than trusting it), mid-stage checkpoints, and one writer per folder (atomic writes and strict JSON
are in harness/files.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from harness import lora
from harness.files import atomic_write, strict_json


def file_digests(folder: Path) -> dict:
    """SHA-256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def data_digest(task) -> str:
    """A short hash of a task's train and test rows: a run records it, and a resume on other
    data (a file edited after an interruption) is refused instead of mixing the two."""
    rows = [dict(row) for split in (task.train, task.test) for row in split]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_problem(stage: Path) -> str | None:
    """What is wrong with a finished stage's folder (a missing or changed file), or None."""
    try:
        manifest = json.loads((stage / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "its manifest.json is missing or damaged"
    found = file_digests(stage)
    for name, digest in manifest.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} was changed or damaged"
    return None


def last_finished_stage(folder, on_damage=None) -> int:
    """The index k of the last stage such that stages 0..k are finished and intact, or -1. A
    stage is finished when its folder exists (stages are renamed into place when complete), and
    intact when every file matches its manifest; on_damage(k, problem) hears of the first one
    that does not, which is then recomputed with everything after it."""
    k = -1
    while folder is not None and (Path(folder) / f"stage{k + 1}").is_dir():
        problem = stage_problem(Path(folder) / f"stage{k + 1}")
        if problem:
            if on_damage:
                on_damage(k + 1, problem)
            break
        k += 1
    return k


def save_weights(model, folder):
    """A model's weights for a resume: save_pretrained, or a LoRA adapter alone (harness/lora.py:
    the base is the run's own model, loaded again on a resume)."""
    if lora.is_lora(model):
        lora.save_adapter(model, folder)
    else:
        model.save_pretrained(folder)


def load_weights(model, folder):
    """Weights written by save_weights, loaded in place."""
    if lora.is_lora(model):
        return lora.load_adapter(model, folder)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())


def save_stage(folder, k, record, policy, tokenizer, teacher, extra=None):
    """Write stage k atomically: a temporary folder renamed into place, so a crash leaves either
    the whole stage or nothing, with a manifest of its files' digests that a resume checks. The
    teacher is saved with the policy: resuming needs it. extra: more JSON files, {name: obj}."""
    final, tmp = Path(folder) / f"stage{k}", Path(folder) / f"stage{k}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(policy, tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if teacher is not None and teacher.model is not None:
        save_weights(teacher.model, tmp / "teacher")
    for name, obj in (extra or {}).items():
        (tmp / name).write_text(json.dumps(obj))
    (tmp / "stage.json").write_text(json.dumps(strict_json(record), indent=1, allow_nan=False))
    (tmp / "manifest.json").write_text(json.dumps(file_digests(tmp), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_stage_weights(folder, k, policy, teacher):
    """Stage k's weights, loaded in place into the policy and the teacher (if it has weights)."""
    stage = Path(folder) / f"stage{k}"
    for target, sub in ((policy, "policy"), (teacher and teacher.model, "teacher")):
        if target is not None:
            load_weights(target, stage / sub)


def stage_records(folder, done) -> list:
    """The records (stage.json) of stages 0..done of a run folder."""
    return [json.loads((Path(folder) / f"stage{k}" / "stage.json").read_text())
            for k in range(done + 1)]


def stored_row0(folder) -> dict:
    """Row 0 of a run folder as sdpo_cl.base_row() returns it: its record and the base's answers
    that response drift is measured on."""
    sequences = json.loads((Path(folder) / "stage0" / "base_sequences.json").read_text())
    return {"record": stage_records(folder, 0)[0], "sequences": sequences}


def resume(folder, done, policy, teacher) -> list:
    """The records of stages 0..done of a run folder, with stage done's weights loaded into the
    policy and the teacher: where sdpo_cl.continual_sequence picks up (Hooks.resume)."""
    records = stage_records(folder, done)
    if done > 0:
        load_stage_weights(folder, done, policy, teacher)
    return records


# ---- Inside a stage: one checkpoint every few rollout batches, the previous one replaced ---------

def save_midstage(folder, k, step, state):
    """Keep what a stage stopped after `step` needs to go on exactly as without a stop (on CPU):
    the policy (or its adapter) and the teacher, the optimizer and the learning-rate schedule,
    every random state, the rest of the pass over the prompts and the steps' metrics. Written
    whole beside the last one, then swapped in: at most one mid-stage checkpoint on disk, and a
    crash while writing leaves the previous one."""
    final, tmp = Path(folder) / "midstage", Path(folder) / "midstage.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(state["policy"], tmp / "policy")
    teacher = state["teacher"]
    if teacher is not None and teacher.model is not None:
        save_weights(teacher.model, tmp / "teacher")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"stage": k, "step": step, "order": list(state["order"]),
                "history": strict_json(state["history"]), "rng": state["rng"].getstate(),
                "random": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda,
                "optimizer": state["optimizer"].state_dict(),
                "scheduler": state["scheduler"].state_dict()}, tmp / "loop.pt")
    if final.exists():
        os.replace(final, Path(folder) / "midstage.old")
    os.replace(tmp, final)
    shutil.rmtree(Path(folder) / "midstage.old", ignore_errors=True)


def midstage(folder) -> Path | None:
    """The folder of the mid-stage checkpoint (or of the one before it, if a crash came between
    the two renames of save_midstage), or None."""
    for name in ("midstage", "midstage.old"):
        if (Path(folder) / name / "loop.pt").is_file():
            return Path(folder) / name
    return None


def midstage_step(folder, k) -> int:
    """The last step kept by a mid-stage checkpoint of stage k, or -1."""
    found = midstage(folder)
    if found is None:
        return -1
    loop = torch.load(found / "loop.pt", weights_only=False)
    return loop["step"] if loop["stage"] == k else -1


def load_midstage(folder, k, state) -> int:
    """Restore a stage k stopped midway into the loop's `state`, in place (weights, optimizer,
    schedule, random states, the pass over the prompts, the metrics so far); the next step, or
    0 when there is no checkpoint of stage k."""
    found = midstage(folder)
    if found is None:
        return 0
    loop = torch.load(found / "loop.pt", weights_only=False)
    if loop["stage"] != k:
        return 0
    load_weights(state["policy"], found / "policy")
    if state["teacher"] is not None and state["teacher"].model is not None:
        load_weights(state["teacher"].model, found / "teacher")
    state["optimizer"].load_state_dict(loop["optimizer"])
    state["scheduler"].load_state_dict(loop["scheduler"])
    state["rng"].setstate(loop["rng"])
    random.setstate(loop["random"])
    torch.set_rng_state(loop["torch"])
    if loop["cuda"]:
        torch.cuda.set_rng_state_all(loop["cuda"])
    state["order"][:] = loop["order"]
    state["history"][:] = loop["history"]
    return loop["step"] + 1


def drop_midstage(folder):
    """A finished stage needs no mid-stage checkpoint: removed."""
    for name in ("midstage", "midstage.old", "midstage.tmp"):
        shutil.rmtree(Path(folder) / name, ignore_errors=True)


def keep_log_lines(path: Path, keep):
    """Drop the log lines of stages that will be run again (an interrupted stage)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept))


class RunLock:
    """One writer per run folder: a lock file holding the owner's pid. A second process is
    refused; a lock left by a process that no longer runs is taken over, with a note."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    owner = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and process_alive(owner):
                    raise ValueError(f"run folder {self.path.parent} is in use by process "
                                     f"{owner}; wait for it to finish or stop it (a second "
                                     f"writer would corrupt the run)") from None
                print(f"note: taking over the lock of process {owner or '?'}, which no longer "
                      f"runs")
                self.path.unlink(missing_ok=True)
        raise ValueError(f"could not lock run folder {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
