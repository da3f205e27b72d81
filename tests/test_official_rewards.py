"""The official rewards of the paper's domains, chosen by a row's `kind`, on rows in the official
layout: mcq (SciKnowEval), tooluse (ToolAlpaca), math (math-verify on the last \\boxed{}),
and the dispatch by kind."""
import json

import pytest

from harness import data

MCQ = {"kind": "mcq", "answer": "A"}
TOOL_ANSWER = json.dumps([
    {"Action": "searchImages", "Action_Input": json.dumps({"color": "wild", "size": "", "page": 1})},
    {"Action": "getDetails", "Action_Input": {"id": "7"}}])
TOOL = {"kind": "tooluse", "answer": TOOL_ANSWER}
MATH = {"kind": "math", "answer": "\\frac{1}{2}"}


@pytest.mark.parametrize("completion, reward", [
    ("<reasoning>it is A</reasoning><answer>A</answer>", 1.0),
    ("A", 1.0),                                      # no tag: the whole completion, stripped
    (" A \n", 1.0),
    ("<answer>A: 2270.7</answer>", 0.0),             # only the letter counts
    ("<answer>a</answer>", 0.0),                     # case-sensitive
    ("<answer>B</answer> no wait <answer>A</answer>", 1.0),   # the last tag
    ("<answer>A</answer> no wait <answer>B</answer>", 0.0),
    ("<answer> A ", 1.0),                            # an unclosed last tag: the rest, stripped
])
def test_mcq_is_the_text_after_the_last_answer_tag(completion, reward):
    assert data.official_reward(completion, MCQ) == reward


@pytest.mark.parametrize("completion, reward, well_formed", [
    ("... so the answer is \\boxed{B}", 1.0, True),     # the last standalone A-D
    ("A or B? I pick b.", 1.0, True),                   # upper-cased first: 'b' counts
    ("B, not C", 0.0, True),                            # the last one is C
    ("ABC", 0.0, False),                                # no standalone letter: the whole text
    ("B.", 1.0, True)])
def test_gpqa_is_the_last_standalone_letter(completion, reward, well_formed):
    row = {"kind": "gpqa", "answer": "B"}
    assert data.official_reward(completion, row) == reward
    assert data.official_well_formed(completion, row) == well_formed


def test_tooluse_needs_every_action_and_the_merged_inputs():
    right = ('Thought: find images\nAction: searchImages\nAction Input: {"color": "wild", '
             '"size": "", "page": 1}\nAction: getDetails\nAction Input: {"id": "7"}')
    assert data.official_reward(right, TOOL) == 1.0
    swapped = ('Action: getDetails\nAction Input: {"id": "7"}\nAction: searchImages\n'
               'Action Input: {"page": 1, "size": "", "color": "wild"}')
    assert data.official_reward(swapped, TOOL) == 1.0           # a multiset; dicts merged
    assert data.official_reward(right.replace('"size": "", ', ""), TOOL) == 0.0   # empty field
    assert data.official_reward(right.replace('"page": 1', '"page": "1"'), TOOL) == 0.0  # types
    assert data.official_reward(right + "\nAction: getDetails", TOOL) == 0.0   # one call too many
    feedback = data.official_feedback(right.replace("getDetails", "getInfo"), TOOL)
    assert feedback.startswith("Actions mismatch")


def test_tooluse_skips_input_that_is_not_json():
    names, inputs = data.tool_calls('Action: a\nAction Input: {not json}\nAction Input: {"x": 1}')
    assert names == ["a"] and inputs == {"x": 1}


@pytest.mark.parametrize("completion, reward", [
    ("so the answer is \\boxed{\\frac{1}{2}}", 1.0),     # the same string
    ("so the answer is \\boxed{0.5}", 1.0),              # equal by math-verify
    ("\\boxed{2} first, then \\boxed{1/2}", 1.0),           # the last box
    ("the answer is 1/2", 0.0),                          # no box
    ("\\boxed{1/3}", 0.0),
    ("\\boxed{\\frac{1}{2}}" + " and a long explanation" * 6, 0.0),   # outside the last 100 chars
])
def test_math_verifies_the_last_boxed_answer(completion, reward):
    assert data.official_reward(completion, MATH) == reward


def test_math_feedback_is_about_the_format_only():
    assert "\\boxed{your_answer}" in data.official_feedback("it is one half", MATH)
    assert data.official_feedback("\\boxed{7}", MATH) is None


def test_a_row_without_kind_is_exact_match():
    ex = {"kind": "", "answer": "New  York"}
    assert data.official_reward("  new york ", ex) == 1.0
    assert data.official_reward("I think <answer>new york</answer>", ex) == 1.0
    assert data.official_reward("Boston", ex) == 0.0
