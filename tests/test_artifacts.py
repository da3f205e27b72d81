"""Format artifacts, the collapse finding's measures: samples out of the task's format, repeated
n-grams, and whether the teacher's targets pull the student toward an artifact."""
import math

import pytest
import torch

from harness import measures
from harness import data, lab


def test_a_tag_leaked_into_a_tool_call_is_malformed():
    tool = lab.make_lab_task("tool", "lab-short", n_train=5, n_test=5)
    assert tool.well_formed("send(dan,10,sun)", {})
    assert not tool.well_formed("send(dan,10,<answer>10</answer>", {})


def test_the_teachers_pull_is_teacher_minus_student_log_prob_on_the_masked_tokens():
    student = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]],
                                      [[0.5, 0.5], [0.5, 0.5]]]))              # [2, 2, 2]
    teacher = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7]],
                                      [[0.1, 0.9], [0.1, 0.9]]]))
    ids = torch.tensor([[0, 1], [1, 1]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])               # only the first sample counts
    expected = ((math.log(0.8) - math.log(0.5)) + (math.log(0.7) - math.log(0.1))) / 2
    assert measures.teacher_pull(student, teacher, ids, mask) == pytest.approx(
        expected, abs=1e-5)
    assert measures.teacher_pull(student, teacher, ids, torch.zeros(2, 2)) is None


def test_repetition_counts_responses_that_repeat_an_ngram():
    out = measures.format_artifacts(["a b c a b c a b c", "x y z"])
    assert out["repetition_frac"] == 0.5 and out["top_repeated"] == "a b c"


@pytest.mark.parametrize("kind, completion, well_formed", [
    ("mcq", "<reasoning>...</reasoning><answer>B</answer>", True),
    ("mcq", "B", True),
    ("mcq", "The answer is B: Tin.", False),            # prose, no letter the reward can read
    ("tooluse", "Action: send\nAction Input: {\"to\": \"dan\"}", True),
    ("tooluse", "I would send it to dan.", False),
    ("math", "so \\boxed{7}", True),
    ("math", "so it is 7", False),
    ("code", "```python\nprint(1)\n```", True),
    ("code", "print(1)", False),
    ("", "anything", True),                              # no kind: not judged
])
def test_the_official_kinds_have_a_format_right_or_wrong(kind, completion, well_formed):
    assert data.official_well_formed(completion, {"kind": kind}) is well_formed


def test_a_wrapper_leak_is_another_familys_wrapper_in_an_answer():
    from harness.lab_families import WRAPPERS
    answers = ["on=fri,to=dan,at=7 send(dan,7,fri)",                       # clean
               "on=fri,to=dan,at=7 \\boxed{send(dan,7,fri)}",              # math's box leaked
               "\\boxed{1} <answer>2</answer> send(a,b,c)"]               # two leaks
    leaks = measures.wrapper_leaks(answers, "tool", WRAPPERS)
    assert leaks == {"math": pytest.approx(2 / 3), "science": pytest.approx(1 / 3), "code": 0.0}


def test_an_answer_without_an_end_is_counted_unfinished(random_lab):
    """unfinished_rate, measured at every step: the share of answers without an EOS within the
    budget (one of four here)."""
    from types import SimpleNamespace
    import sdpo_cl as s
    model, tok = random_lab
    eos, other = tok.eos_token_id, tok.eos_token_id + 5
    rollout = SimpleNamespace(response_ids=torch.tensor([[other, eos], [eos, other], [other, other],
                                                         [other, eos]]), completions=[""] * 4)
    targets = SimpleNamespace(rewards=torch.zeros(4), teacher_of=None)
    task = SimpleNamespace(name="x", well_formed=None)
    out = measures.step_artifacts(model, None, task, rollout, [{}] * 4, targets,
                                  s.Config(group_size=2), tok)
    assert out["unfinished_rate"] == pytest.approx(0.25)
