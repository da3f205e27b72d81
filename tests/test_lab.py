"""The lab is an instrument. Every run loads the same shipped base (a file the code records by
hash), and that base has the properties a measurement of forgetting needs, fixed before any
method is compared: a training signal at temperature 1 in every trained family, and a real
self-teacher (a correct demonstration in the prompt lifts accuracy)."""
import hashlib

import pytest
import torch

import sdpo_cl as s
from harness import lab
import eval_forgetting
import run_sequence


@pytest.fixture(scope="module")
def base():
    return run_sequence.load_policy("lab")


def test_the_shipped_base_is_the_recorded_file():
    assert lab.LAB_BASE_FILE.stat().st_size <= 2_000_000
    assert hashlib.sha256(lab.LAB_BASE_FILE.read_bytes()).hexdigest() == lab.LAB_BASE_SHA256


def test_every_lab_run_starts_from_the_shipped_weights(base):
    from safetensors.torch import load_file
    state = base[0].state_dict()
    shipped = load_file(str(lab.LAB_BASE_FILE))
    assert all(torch.equal(state[name], tensor) for name, tensor in shipped.items())
    assert torch.equal(state["lm_head.weight"], shipped["model.embed_tokens.weight"])   # tied


def test_the_shipped_base_has_its_recorded_accuracies(base):
    """Within 5 points on any CPU (the sampled evaluation is seeded; CPUs differ only in float
    rounding, which changes a sampled token only when a draw falls on a boundary)."""
    tasks = [lab.make_lab_task(name) for name in lab.LAB_SEQUENCE + lab.LAB_PROBES]
    record = s.base_row(*base, tasks, lab.lab_config())["record"]
    assert set(record["accuracy"]) == set(lab.LAB_BASE_ACCURACY)
    for name, accuracy in lab.LAB_BASE_ACCURACY.items():
        assert record["accuracy"][name] == pytest.approx(accuracy, abs=0.05), name


@pytest.mark.parametrize("name", lab.LAB_SEQUENCE)
def test_each_trained_family_gives_both_methods_a_signal(base, name):
    torch.manual_seed(0)
    check = eval_forgetting.signal_check(*base, lab.make_lab_task(name), lab.lab_config())
    assert 0.2 <= check["reward"] <= 0.7          # temperature 1: GRPO sees mixed groups
    assert check["zero_adv_groups"] <= 0.5
    assert check["teacher_lift"] >= 0.2           # SDPO's teacher can use a demonstration
    assert check["warnings"] == []


def test_the_signal_check_warns_where_a_method_would_have_almost_no_signal():
    starved = {"solved_groups": 0.05, "zero_adv_groups": 0.95, "teacher_lift": 0.01}
    warnings = eval_forgetting.signal_warnings(starved)
    assert len(warnings) == 3 and "SDPO" in warnings[0] and "GRPO" in warnings[1]
    assert eval_forgetting.signal_warnings({"solved_groups": 0.1, "zero_adv_groups": 0.9,
                                            "teacher_lift": 0.05}) == []
