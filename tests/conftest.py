"""What several test files share: a private model cache; work computed beside the tests, on the
second core; the command line of a tiny run, and one such run (smoke_run) made once; a task in
the official data layout; the shipped lab policy, a tiny lab base and a random lab model, each
loaded once; a reward that mixes every group whatever the model samples; a small rollout batch
of a model with its loss targets; flat parameters and gradients."""
import contextlib
import ctypes
import dataclasses
import io
import itertools
import json
import os
import pickle
import signal
import sys
import time
import traceback
import zlib
from types import SimpleNamespace

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab

# The lab's matrices are tiny (width 96): a second thread only adds synchronisation, and on a busy
# 2-core machine OpenMP's waiting threads make every operation an order of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests build their own lab models in a temporary cache, never reading the user's."""
    os.environ["SDPO_CL_CACHE"] = str(tmp_path_factory.mktemp("sdpo_cl_cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


# --- Work computed beside the tests ---------------------------------------------------------------
# The tests run one at a time, each on one thread: the second core is idle. A long computation that
# needs nothing from other tests is declared with @computed_ahead(fixture name) on a function of a
# folder of its own: when a selected test uses that fixture, it starts as the session starts, in a
# process forked from this one (torch already loaded, the private cache already set), one such
# computation after another in the order the tests need them; the fixture waits for its value.
# The files of those tests run last.

AHEAD = {}          # fixture name -> the function computing its value, in no test's process


def pytest_collection_modifyitems(items):
    """The test files that read work computed ahead run last (each file's tests in their order),
    giving that work the whole of the other files' time."""
    waiting = {item.module for item in items if AHEAD.keys() & set(item.fixturenames)}
    items.sort(key=lambda item: item.module in waiting)


def computed_ahead(name):
    """@computed_ahead("x") on a function of a folder: a session fixture "x", its value."""
    def register(compute):
        AHEAD[name] = compute

        @pytest.fixture(scope="session", name=name)
        def fixture(ahead):
            return ahead(name)
        return fixture
    return register


@pytest.fixture(scope="session", autouse=True)
def ahead(private_cache, request, tmp_path_factory):
    """name -> the value of the computation registered under it, waiting for it if need be.
    Elsewhere than on Linux (where forking a process that has loaded torch is less safe), each
    is computed in the test's own process when a test first needs it."""
    needed = [name for item in request.session.items for name in item.fixturenames
              if name in AHEAD]
    order, folder = list(dict.fromkeys(needed)), tmp_path_factory.mktemp("ahead")
    pid = os.fork() if order and sys.platform == "linux" else None
    if pid == 0:                                         # the forked process: compute, write
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG: dies with the tests
        quiet = os.open(os.devnull, os.O_WRONLY)         # nothing in the tests' captured output
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        for name in order:
            try:
                (folder / name).mkdir()
                value = ("value", AHEAD[name](folder / name))
            except BaseException:                        # noqa: B036 (reported to the test)
                value = ("error", traceback.format_exc())
            (folder / f"{name}.tmp").write_bytes(pickle.dumps(value))
            (folder / f"{name}.tmp").rename(folder / f"{name}.pickle")
        os._exit(0)
    exited = []

    def value(name):
        if pid is None:
            (folder / name).mkdir()
            return AHEAD[name](folder / name)
        path = folder / f"{name}.pickle"
        while not path.exists():
            if exited:
                pytest.fail(f"the process computing {name} ahead stopped without a result")
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                exited.append(True)                      # look once more: it may have written
            else:                                        # it just before it ended
                time.sleep(0.05)
        kind, got = pickle.loads(path.read_bytes())
        if kind == "error":
            pytest.fail(f"computing {name} ahead failed:\n{got}")
        return got
    yield value
    if pid and not exited:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# --- The command line of a tiny run ---------------------------------------------------------------

TINY_LAB_STEPS = 10      # pre-training steps of the tiny lab base (`--lab-steps`); one per session
TINY_FLAGS = {"model": "lab-short", "tasks": "math", "probes": "", "steps": "1",
              "lab_steps": str(TINY_LAB_STEPS), "methods": "grpo"}
TINY_SETS = ("prompts_per_step=4", "eval_examples=4")


def tiny_argv(*sets, **flags) -> list:
    """run_sequence.py's arguments for a run small enough for a test: TINY_FLAGS updated by
    `flags` (lab_steps for --lab-steps; None leaves a flag out), then --set TINY_SETS and `sets`
    (last, as --set takes every word after it)."""
    merged = {**TINY_FLAGS, **flags}
    argv = [word for key, value in merged.items() if value is not None
            for word in (f"--{key.replace('_', '-')}", str(value))]
    return argv + ["--set", *TINY_SETS, *sets]


SMOKE_ARGV = tiny_argv("eval_examples=10", tasks="math,code", probes="tool", steps="2",
                       methods="grpo,sdpo")


def coin_reward(completion, example):
    """1 or 0 by a hash of the completion's text: right or wrong at random, but the same for the
    same answer on every machine. A tiny base seldom answers right; varied answers scored by
    this one make mixed groups, so every stage trains."""
    return float(zlib.crc32(completion.encode()) % 2)


@computed_ahead("smoke_run")
def make_smoke_run(folder):
    """run_sequence.py on SMOKE_ARGV, once per session (math then code, probe tool, grpo and
    sdpo, two rollout batches per task), every task scored by coin_reward: (its run folder, the
    results it returned, what it printed)."""
    load_task = run_sequence.load_task

    def scored_by_coin(name, model="lab"):
        task = load_task(name, model)
        task.reward = coin_reward
        return task
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(run_sequence, "load_task", scored_by_coin)
        results = run_sequence.main(SMOKE_ARGV + ["--out", str(folder), "--name", "smoke"])
    return folder / "smoke", results, printed.getvalue()


# --- A task in the official data layout -----------------------------------------------------------

MCQ_ROWS = [{"prompt": f"Which letter is {c}? A) a B) b C) c D) d", "answer": c.upper(),
             "system": "Answer with <answer>X</answer>.", "kind": "mcq"} for c in "abcd"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def official_task(tmp_path):
    """A folder 'letters' in the official SDPO layout: the four MCQ_ROWS to train on, two to
    test."""
    folder = tmp_path / "letters"
    folder.mkdir()
    write_jsonl(folder / "train.json", MCQ_ROWS)
    write_jsonl(folder / "test.json", MCQ_ROWS[:2])
    return folder


# --- Models ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shipped_lab():
    """(model, tokenizer): the shipped base of the lab in the paper's regime, loaded once."""
    return run_sequence.load_policy("lab")


@pytest.fixture(scope="session")
def short_lab():
    """(model, tokenizer): the shipped lab-short base (answers of 2-4 tokens: the cheap model the
    mechanics are tested on), loaded once. Tests that train deep-copy it."""
    return run_sequence.load_policy("lab-short")


@pytest.fixture(scope="session")
def tiny_base():
    """(model, tokenizer): a lab base pre-trained for TINY_LAB_STEPS steps on this machine, the
    one that tiny_argv()'s --lab-steps loads from the session's cache. What it samples differs
    from CPU to CPU: tests on it assert properties, never what it answers."""
    recipe = dataclasses.replace(lab.LABS["lab-short"].recipe, steps=TINY_LAB_STEPS)
    return lab.lab_base(recipe, verbose=False)


@pytest.fixture(scope="session")
def random_lab():
    """(model, tokenizer): an untrained lab model (seed 0): cheap, and its samples are varied.
    Shared: tests that train it deep-copy it first."""
    tok = lab.build_lab_tokenizer("lab-short")
    return lab.build_lab_model(tok, seed=0), tok


# --- Rewards --------------------------------------------------------------------------------------

def alternating_reward():
    """A reward that answers 1, 0, 1, 0, ... in the order it is asked, whatever the completion:
    sample_rollout scores a batch in order, so every group of an even size is half solved
    (mixed GRPO advantages, a demonstration for every sample) on any machine. Make a fresh one
    for each run that must see the same rewards as another."""
    flips = itertools.cycle([1.0, 0.0])
    return lambda completion, example: next(flips)


# --- A rollout batch of the random lab model ------------------------------------------------------

def rollout_batch(policy, tokenizer, cfg, n_prompts=2, seed=0):
    """n_prompts lab math prompts x cfg.group_size samples drawn at cfg.temperature by
    sample_rollout, cut to ragged lengths (T, T - 2, T - 4, T, ...: a random model seldom ends an
    answer), alternating rewards, and the loss targets of cfg: what micro_batch_loss takes.
    rows: every row (one mini-batch)."""
    task = lab.make_lab_task("math", n_train=n_prompts, n_test=1)
    task.reward = alternating_reward()
    examples = [task.train[i] for i in range(n_prompts)]
    torch.manual_seed(seed)
    rollout, samples, rewards = s.sample_rollout(policy, tokenizer, task, examples, cfg)
    T = rollout.response_ids.shape[1]
    lengths = torch.tensor([max(1, T - 2 * (i % 3)) for i in range(len(rewards))])
    rollout.response_mask = rollout.response_mask * (torch.arange(T)[None] < lengths[:, None])
    rollout.old_logprobs = rollout.old_logprobs * rollout.response_mask
    targets = s.loss_targets(rollout, samples, rewards, task, tokenizer, cfg)
    return SimpleNamespace(task=task, rollout=rollout, samples=samples, rewards=rewards,
                           targets=targets, rows=torch.arange(len(rewards)))


def flat_grad(model):
    """Every parameter's gradient in one vector (zeros where there is none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_and_resume(cfg, model, tok, folder):
    """A run through lab-short's math then code in folder/a (an alternating reward: asked an even
    number of times per evaluation and step, it answers a resumed stage as the uninterrupted
    one), and the same run resumed in folder/b after a crash during stage 2 (its folder gone:
    atomic writes leave nothing half-written). Both results, each record without its wall
    times, which no two runs share."""
    import copy
    import shutil
    import run_sequence
    from harness import lab

    def sequence():
        tasks = [lab.make_lab_task(name, "lab-short", n_test=8) for name in ("math", "code")]
        for task in tasks:
            task.reward = alternating_reward()
        return tasks

    def without_times(record):
        out = {k: v for k, v in record.items() if k != "seconds"}
        out["train"] = {k: v for k, v in record.get("train", {}).items()
                        if k != "seconds_per_step"}
        return out
    full = run_sequence.run_in_folder(cfg, copy.deepcopy(model), tok, sequence(), [], folder / "a")
    shutil.copytree(folder / "a", folder / "b")
    shutil.rmtree(folder / "b" / "stage2")
    resumed = run_sequence.run_in_folder(cfg, copy.deepcopy(model), tok, sequence(), [],
                                         folder / "b")
    return [without_times(r) for r in full], [without_times(r) for r in resumed]
