"""The lab is an instrument. Every run loads the same shipped base (a file the code records by
hash), and that base has the properties a measurement of forgetting needs, fixed before any
method is compared: a training signal at temperature 1 in every trained family, and a real
self-teacher (a correct demonstration in the prompt lifts accuracy). Every sampled number is
checked with a tolerance of 3 standard errors, so the checks hold on any CPU."""
import hashlib
import math

import pytest
import torch

import sdpo_cl as s
from harness import lab
import eval_forgetting


@pytest.fixture(scope="module")
def base_record(shipped_lab):
    """Row 0 of the default run: the shipped base on every lab task (100 test prompts x 4
    samples at temperature 0.6, seeded), with the teacher lift."""
    tasks = [lab.make_lab_task(name) for name in lab.LAB_SEQUENCE + lab.LAB_PROBES]
    return s.base_row(*shipped_lab, tasks, lab.lab_config())["record"]


def test_the_shipped_base_is_the_recorded_file():
    assert lab.LAB_BASE_FILE.stat().st_size <= 2_000_000
    assert hashlib.sha256(lab.LAB_BASE_FILE.read_bytes()).hexdigest() == lab.LAB_BASE_SHA256


def test_every_lab_run_starts_from_the_shipped_weights(shipped_lab):
    from safetensors.torch import load_file
    state = shipped_lab[0].state_dict()
    shipped = load_file(str(lab.LAB_BASE_FILE))
    assert all(torch.equal(state[name], tensor) for name, tensor in shipped.items())
    assert torch.equal(state["lm_head.weight"], shipped["model.embed_tokens.weight"])   # tied


def test_the_shipped_base_has_its_recorded_accuracies(base_record):
    """Another CPU (or another transformers) draws other samples from the same distributions:
    the recorded and the measured accuracy are then two estimates with a standard error se each
    (over the 100 prompts), their difference sqrt(2) se. Allowed: 3 standard errors of it."""
    assert set(base_record["accuracy"]) == set(lab.LAB_BASE_ACCURACY)
    for name, recorded in lab.LAB_BASE_ACCURACY.items():
        tolerance = 3 * math.sqrt(2) * base_record["stderr"][name]
        assert abs(base_record["accuracy"][name] - recorded) <= tolerance, name


def at_least(value, bound, se):
    """value >= bound, or within 3 standard errors of it: a sampled estimate that cannot show
    the property is violated."""
    return value >= bound - 3 * se


@pytest.mark.parametrize("name", lab.LAB_SEQUENCE)
def test_each_trained_family_gives_both_methods_a_signal(shipped_lab, base_record, name):
    """At temperature 1 on 64 training prompts x 8 samples: mixed rewards (GRPO has advantages),
    groups with a success (SDPO has demonstrations), and a teacher a demonstration helps. Each
    bound with 3 standard errors of slack: over the 64 prompts for the reward (at most
    sqrt(r (1 - r) / 64)) and the shares of groups, over the 100 test prompts for the lift (its
    plain accuracy's, and at most 0.05 for the one with a demonstration)."""
    torch.manual_seed(0)
    check = eval_forgetting.signal_check(*shipped_lab, lab.make_lab_task(name), lab.lab_config(),
                                         base_record["teacher_lift"][name])
    share_se = lambda p: math.sqrt(max(p * (1 - p), 1 / 64) / 64)
    reward, se_reward = check["reward"], math.sqrt(check["reward"] * (1 - check["reward"]) / 64)
    assert at_least(reward, 0.2, se_reward) and at_least(0.7, reward, se_reward)
    assert at_least(0.5, check["zero_adv_groups"], share_se(check["zero_adv_groups"]))
    assert at_least(check["solved_groups"], 0.5, share_se(check["solved_groups"]))
    se_lift = math.sqrt(base_record["stderr"][name] ** 2 + 0.05 ** 2)
    assert at_least(check["teacher_lift"], 0.2, se_lift)


def test_the_signal_check_warns_where_a_method_would_have_almost_no_signal():
    starved = {"solved_groups": 0.05, "zero_adv_groups": 0.95, "teacher_lift": 0.01}
    warnings = eval_forgetting.signal_warnings(starved)
    assert len(warnings) == 3 and "SDPO" in warnings[0] and "GRPO" in warnings[1]
    assert eval_forgetting.signal_warnings({"solved_groups": 0.1, "zero_adv_groups": 0.9,
                                            "teacher_lift": 0.05}) == []
