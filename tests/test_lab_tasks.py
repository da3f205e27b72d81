"""The lab's tokenizer and task families: a character-level tokenizer with a chat template,
unique test prompts, a right answer that earns 1 and a wrong habit that earns 0, the rewards and
their feedback."""
import sdpo_cl as s
from harness import data
from harness import lab


def test_lab_tokenizer_is_character_level_with_a_chat_template(random_lab):
    _, tok = random_lab
    text = s.format_prompt(tok, "3+4=")
    assert text == "<|user|>3+4=<|assistant|>"
    ids = tok(text + "7", add_special_tokens=False).input_ids
    assert len(ids) == 1 + 4 + 1 + 1                            # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "3+4=7"


def test_lab_rewards_score_answers_and_feedback_names_the_first_error():
    assert lab.number_reward("42 is it", {"answer": "42"}) == 1.0
    assert lab.number_feedback("40", {"answer": "42"}) == "Your answer 40 is too small."
    assert data.mcq_reward("<answer>A</answer> no, <answer>C</answer>",
                           {"answer": "<answer>C</answer>"}) == 1.0
    assert data.mcq_reward("C", {"answer": "<answer>C</answer>"}) == 1.0   # no tag: the whole text
    assert data.mcq_reward("<answer>c</answer>", {"answer": "C"}) == 0.0   # case-sensitive
    assert lab.tool_feedback("send(ann,3,hi,mon)", {"answer": "send(ann,4,hi,mon)"}) == \
        "Argument 2 ('3') is wrong."
    assert lab.string_feedback("abd", {"answer": "abc"}) == \
        "Test failed: the output is wrong at position 3."


def test_lab_tasks_have_unique_test_prompts_right_answers_and_wrong_habits():
    for name in lab.LAB_FAMILIES:
        task = lab.make_lab_task(name, n_train=50, n_test=40)
        assert len(set(task.test["prompt"])) == 40
        for ex in task.test:                        # the gold answer earns 1, the habit 0
            assert task.reward(ex["answer"], ex) == 1.0
            assert task.reward(ex["habit"], ex) == 0.0
