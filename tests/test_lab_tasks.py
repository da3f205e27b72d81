"""The labs' tokenizer and task families: a character-level tokenizer with a chat template,
unique test prompts, right solutions that earn 1 and a wrong habit that earns 0, in the family's
form; in the paper's-regime lab, answers that are a trace and a final answer in the family's
own wrapper, with more than one valid trace per prompt; the short lab's feedback."""
import random
import statistics

import pytest

import sdpo_cl as s
from harness import data, lab, lab_families

FAMILIES = [(name, family) for name, spec in lab.LABS.items() for family in spec.families]


def test_lab_tokenizer_is_character_level_with_a_chat_template(random_lab):
    _, tok = random_lab
    text = s.format_prompt(tok, "3+4=")
    assert text == "<|user|>3+4=<|assistant|>"
    ids = tok(text + "7", add_special_tokens=False).input_ids
    assert len(ids) == 1 + 4 + 1 + 1                            # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "3+4=7"


def test_the_wrappers_are_one_token_each():
    tok = lab.build_lab_tokenizer("lab")
    for word in ("\\boxed{", "<answer>", "</answer>", "```", "<think>", "</think>"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("lab_name, name", FAMILIES)
def test_right_solutions_earn_1_and_the_habit_0_both_in_the_familys_form(lab_name, name):
    """On the default lab a family's habit is its predecessor's convention, which gives the
    same answer where neither wraps the sum (about a fifth of the prompts): there the habit
    is right."""
    family = lab.LABS[lab_name].families[name]
    task = lab.make_lab_task(name, lab_name, n_train=50, n_test=40)
    assert len(set(task.test["prompt"])) == 40
    rng = random.Random(0)
    habit_right = 0
    for ex in task.test:
        right, habit = family.solve(ex, rng, False), family.solve(ex, rng, True)
        assert task.reward(right, ex) == 1.0, right
        habit_right += task.reward(habit, ex)
        assert task.well_formed(right, ex) and task.well_formed(habit, ex), (right, habit)
    assert habit_right <= (0.4 * len(task.test) if lab_name == "lab" else 0)   # 20% expected


@pytest.mark.parametrize("numbers, conventions", [
    ([5, 5, 4, 3], {"math": 17, "science": 7, "tool": 5, "code": 1}),
    ([1, 2, 3, 4], {"math": 10, "science": 0, "tool": 10, "code": 2}),
    ([3, 3, 3, 3], {"math": 12, "science": 2, "tool": 12, "code": 4})])
def test_the_default_labs_families_add_under_their_own_conventions(numbers, conventions):
    """One shared skill: plain (math), a check digit mod 10 (science), clock hours 1-12 (tool),
    3-bit unsigned mod 8 (code), each step of the trace under the family's convention."""
    for name, total in conventions.items():
        modulus = lab_families.CONVENTION[name]
        steps, got = lab_families.convention_steps(numbers, random.Random(0), modulus)
        assert got == total, name
        for step in steps.split(","):
            a, rest = step.split("+")
            b, c = rest.split("=")
            assert int(c) == lab_families.under(int(a) + int(b), modulus)


def test_each_familys_habit_is_the_convention_of_the_family_before_it():
    """The habit of science is math's plain sum, tool's science's check digit, code's tool's
    clock: training a family against its habit bends the skill its predecessor needs."""
    rng = random.Random(1)
    sequence = lab.LABS["lab"].sequence
    for before, name in zip(sequence, sequence[1:]):
        family = lab.LABS["lab"].families[name]
        row = family.make(rng)
        habit = family.solve(row, rng, True)
        final = lab_families.last_wrapped(habit, lab_families.WRAPPERS[name],
                                          lab_families.CLOSE[name])
        assert int(final) == lab_families.under(sum(row["numbers"]),
                                                lab_families.CONVENTION[before])


@pytest.mark.parametrize("name", lab.LABS["lab"].families)
def test_a_paper_regime_answer_has_several_valid_traces(name):
    """Ten right solutions of a prompt: at least two different ones for most prompts (the
    demonstration's path often differs from the student's), all with the same final answer."""
    family = lab.LABS["lab"].families[name]
    task = lab.make_lab_task(name, n_train=1, n_test=40)
    rng = random.Random(0)
    several = 0
    for ex in task.test:
        traces = {family.solve(ex, rng, False) for _ in range(10)}
        several += len(traces) >= 2
    assert several >= 0.9 * len(task.test)


def test_paper_regime_answers_are_long_and_the_final_answer_a_small_part():
    tok = lab.build_lab_tokenizer("lab")
    lengths, finals = [], []
    for name in lab.LABS["lab"].sequence:
        for ex in lab.make_lab_task(name, n_train=1, n_test=50).test:
            lengths.append(len(tok(ex["answer"], add_special_tokens=False).input_ids))
            finals.append(len(tok(ex["final"], add_special_tokens=False).input_ids))
    assert statistics.mean(lengths) >= 20
    assert statistics.mean(finals) <= 0.4 * statistics.mean(lengths)


@pytest.mark.parametrize("name, leaked", [
    ("math", "1+2=3,3+4=7,7+1=8 <answer>8</answer>"),           # science's tag on math
    ("science", "1 odd,3 odd,4 even,5 odd \\boxed{4}"),         # math's box on science
    ("tool", "to=ann,at=3,on=mon \\boxed{send(ann,3,mon)}"),     # the paper's artifact
])
def test_another_familys_wrapper_is_out_of_form(name, leaked):
    task = lab.make_lab_task(name, n_train=1, n_test=1)
    assert not task.well_formed(leaked, {})


def test_a_ladder_probe_is_one_familys_content_in_another_familys_wrapper():
    """math_fenced: math's sum, cued by code's fence at the prompt's start, answered with math's
    trace and the sum in a fence; the same answer in math's own \\boxed{} earns 0."""
    assert set(lab_families.LADDER) <= set(lab.LABS["lab"].families) == set(
        lab_families.CONTENT_FORMAT)
    family = lab.LABS["lab"].families["math_fenced"]
    row = family.make(random.Random(0))
    numbers = row["numbers"]
    assert row["prompt"] == "``` " + "+".join(map(str, numbers)) + "="
    assert row["answer"].endswith(f" ```{sum(numbers)}```") and row["final"] == str(sum(numbers))
    assert family.reward(f"1+1=2 ```{sum(numbers)}```", row) == 1.0
    assert family.reward(f"1+1=2 \\boxed{{{sum(numbers)}}}", row) == 0.0
    tool = lab.LABS["lab"].families["tool_tagged"].make(random.Random(0))
    assert tool["answer"].endswith("<answer>" + tool["final"] + "</answer>")
    assert "send(" not in tool["answer"]


def test_the_trace_lab_reward_reads_only_the_final_answer_in_its_wrapper():
    row = {"final": "12"}
    math = lab.LABS["lab"].families["math"].reward
    assert math("3+4=8,8+2=10,10+2=12 \\boxed{12}", row) == 1.0      # a slip in the trace
    assert math("3+4=7,7+2=9,9+3=12 12", row) == 0.0                    # no box
    assert math("\\boxed{11} then \\boxed{12}", row) == 1.0          # the last box counts


def test_short_lab_rewards_score_answers_and_feedback_names_the_first_error():
    assert lab_families.number_reward("42 is it", {"answer": "42"}) == 1.0
    assert lab_families.number_feedback("40", {"answer": "42"}) == "Your answer 40 is too small."
    assert data.mcq_reward("<answer>A</answer> no, <answer>C</answer>",
                           {"answer": "<answer>C</answer>"}) == 1.0
    assert data.mcq_reward("C", {"answer": "<answer>C</answer>"}) == 1.0   # no tag: the whole text
    assert data.mcq_reward("<answer>c</answer>", {"answer": "C"}) == 0.0   # case-sensitive
    assert lab_families.tool_feedback("send(ann,3,hi,mon)", {"answer": "send(ann,4,hi,mon)"}) \
        == "Argument 2 ('3') is wrong."
    assert lab_families.string_feedback("abd", {"answer": "abc"}) == \
        "Test failed: the output is wrong at position 3."
