"""The lab's task families: two sets, each a generator of rows with a verifier and a habit.

TRACES, the paper's regime: every answer is a reasoning trace and a final answer in the family's
own wrapper, with more than one valid trace per prompt. Four trained families mirror the paper's
Math -> Science -> ToolUse -> Code sequence, each with its wrapper (math in \\boxed{}, science in
<answer> tags, tool use in a call, code in a fenced block), so one family's wrapper can leak into
another's answers, the artifact the paper saw. The trace's steps come in any order (which numbers
are added first, which option is checked first, which argument is read first, a string read
forwards or backwards), so a sibling's demonstration usually takes another path than the
student's own: a teacher that follows the demonstration pulls toward that path where the two
part, the token-level target that can mislead. The reward reads only the final answer in its
wrapper, as the official rewards do.

SHORT, the regime where SDPO's targets are reliable: answers of 2-4 tokens with no trace, the
project's first instrument (lab-short), kept so that its results can be rerun beside the new lab.

A family's solve(row, rng, slip) writes one valid solution, its steps in a random order, or with
slip=True the family's habit: a plausible wrong answer made by a systematic slip (an off-by-one
sum, the first option taken, the arguments in prompt order, the string left as it is). The base
is pre-trained on both, so it samples a right and a wrong behaviour side by side, as a real base
model does; RL and self-distillation then have something to select.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


BOXED, ANSWER, END_ANSWER, FENCE, THINK, END_THINK = ("\\boxed{", "<answer>", "</answer>",
                                                      "```", "<think>", "</think>")
NAMES = ("ann", "bob", "cai", "dan", "eve", "fay")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass
class Family:
    make: Callable          # make(rng) -> a row: prompt, answer (one right solution), ...
    solve: Callable         # solve(row, rng, slip) -> a right solution, or the habit with slip
    reward: Callable        # reward(completion, row) -> 0 or 1
    form: str               # a completion of the family's form, right or wrong (a regex)
    max_new_tokens: int
    feedback: Callable | None = None   # feedback(completion, row) -> what was wrong, or None


# ================================================================================================
# TRACES: the paper's regime
# ================================================================================================

def last_wrapped(text: str, start: str, end: str) -> str | None:
    """The text inside the last start...end pair of `text` (pairs read from the left), or None."""
    found = re.findall(re.escape(start) + "(.*?)" + re.escape(end), text, flags=re.DOTALL)
    return found[-1] if found else None


# --- math: the sum of four numbers, added in any order, in \boxed{} ---------------------------

def sum_steps(numbers, rng, slip) -> str:
    """'4+5=9,9+3=12,12+2=14': the numbers added in a random order; slip: the first sum one too
    large, carried through."""
    order = rng.sample(numbers, len(numbers))
    total, steps = order[0], []
    for i, n in enumerate(order[1:]):
        steps.append(f"{total}+{n}={total + n + (slip and i == 0)}")
        total += n + (slip and i == 0)
    return ",".join(steps), total


def make_math(rng, high=5):
    numbers = [rng.randrange(1, high + 1) for _ in range(4)]
    return {"prompt": "+".join(map(str, numbers)) + "=", "numbers": numbers,
            "answer": f"{sum_steps(numbers, rng, False)[0]} {BOXED}{sum(numbers)}}}",
            "final": str(sum(numbers))}


def solve_math(row, rng, slip):
    steps, total = sum_steps(row["numbers"], rng, slip)
    return f"{steps} {BOXED}{total}}}"


def make_math_hard(rng):                  # probe, never pre-trained: numbers up to 7, not 5
    return make_math(rng, high=7)


def make_math_words(rng):                 # probe: math's content, asked in words
    row = make_math(rng)
    return dict(row, prompt="add " + " ".join(map(str, row["numbers"])))


def make_math_cot(rng):                   # the CoT finding: math with the trace as thinking
    row = make_math(rng)
    return dict(row, prompt="think " + row["prompt"], answer=solve_math_cot(row, rng, False))


def solve_math_cot(row, rng, slip):
    steps, total = sum_steps(row["numbers"], rng, slip)
    return f"{THINK}{steps}{END_THINK} {BOXED}{total}}}"


# --- science: which option has the asked parity, options checked in any order, in <answer> ----

def make_science(rng):
    want_even = rng.random() < 0.5        # the one even digit among odd ones, or the reverse
    right = rng.choice([d for d in range(10) if (d % 2 == 0) == want_even])
    options = rng.sample([d for d in range(10) if (d % 2 == 0) != want_even], 3)
    options.insert(rng.randrange(1, 4), right)      # never first: the habit takes the first
    row = {"prompt": f"{'even' if want_even else 'odd'}? " + " ".join(map(str, options)),
           "options": options, "want_even": want_even, "final": str(right)}
    return dict(row, answer=solve_science(row, rng, False))


def solve_science(row, rng, slip):
    """'5 odd,0 even,1 odd,3 odd <answer>0</answer>': every option labelled, in a random order;
    slip: the labels right, and the first option taken."""
    options = row["options"]
    order = rng.sample(options, len(options))
    pick = options[0] if slip else int(row["final"])
    return (",".join(f"{o} {'even' if o % 2 == 0 else 'odd'}" for o in order)
            + f" {ANSWER}{pick}{END_ANSWER}")


def make_mcq_math(rng):                   # probe: science's format with math's content
    numbers = [rng.randrange(1, 6) for _ in range(4)]
    total = sum(numbers)
    options = [total + 1] + rng.sample([v for v in range(4, 21) if v not in (total, total + 1)], 2)
    rng.shuffle(options)
    options.insert(rng.randrange(1, 4), total)       # the habit's off-by-one is an option too
    row = {"prompt": "+".join(map(str, numbers)) + "? " + " ".join(map(str, options)),
           "numbers": numbers, "final": str(total)}
    return dict(row, answer=solve_mcq_math(row, rng, False))


def solve_mcq_math(row, rng, slip):
    steps, total = sum_steps(row["numbers"], rng, slip)
    return f"{steps} {ANSWER}{total}{END_ANSWER}"


# --- tool: the arguments read in any order, then the call in its canonical order ----------------

def make_tool(rng):
    args = {"to": rng.choice(NAMES), "at": str(rng.randrange(1, 13)), "on": rng.choice(DAYS)}
    parts = [f"{k} {v}" for k, v in args.items()]
    while [p.split()[0] for p in parts] == list(args):   # never canonical: the habit is wrong
        rng.shuffle(parts)
    row = {"prompt": "send " + " ".join(parts), "args": args,
           "prompt_order": [p.split()[0] for p in parts],
           "final": "send({to},{at},{on})".format(**args)}
    return dict(row, answer=solve_tool(row, rng, False))


def solve_tool(row, rng, slip):
    """'on=fri,to=dan,at=7 send(dan,7,fri)': the arguments read in a random order; slip: read
    and called in the prompt's order."""
    args = row["args"]
    order = row["prompt_order"] if slip else rng.sample(list(args), len(args))
    call = row["prompt_order"] if slip else list(args)
    return (",".join(f"{k}={args[k]}" for k in order)
            + " send(" + ",".join(args[k] for k in call) + ")")


# --- code: a string reversed, its letters listed forwards or backwards, in a fenced block --------

def make_code(rng):
    s = ""
    while s == s[::-1]:                   # no palindromes: the habit must be wrong
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(4, 6)))
    row = {"prompt": f"rev({s})", "string": s, "final": s[::-1]}
    return dict(row, answer=solve_code(row, rng, False))


def solve_code(row, rng, slip):
    """'1d,2b,3f,4a ```afbd```' or '4a,3f,2b,1d ```afbd```'; slip: the string as it is."""
    s = row["string"]
    listed = [f"{i + 1}{c}" for i, c in enumerate(s)]
    if rng.random() < 0.5:
        listed.reverse()
    return ",".join(listed) + f" {FENCE}{s if slip else s[::-1]}{FENCE}"


def final_is(extract):
    """A reward that reads the final answer with `extract` and compares it with the row's."""
    return lambda completion, row: float(extract(completion) == row["final"])


def boxed_answer(text):
    return last_wrapped(text, BOXED, "}")


def tagged_answer(text):
    return last_wrapped(text, ANSWER, END_ANSWER)


def called_answer(text):
    return (re.findall(r"send\([^()]*\)", text) or [None])[-1]


# each trained family's wrapper: in another family's answer, a leak (eval_forgetting.wrapper_leaks)
WRAPPERS = {"math": BOXED, "science": ANSWER, "tool": "send(", "code": FENCE}
SUM_TRACE = r"(\d+\+\d+=\d+,){2}\d+\+\d+=\d+"


# what a well-formed answer is: the content family's trace, then its final answer in a wrapper
CLOSE = {"math": "}", "science": END_ANSWER, "tool": ")", "code": FENCE}   # each wrapper's end
TRACE_FORM = {"math": SUM_TRACE, "science": r"(\d (even|odd),){3}\d (even|odd)",
              "tool": r"(\w\w=\w+,){2}\w\w=\w+", "code": r"(\d[a-h],){3,4}\d[a-h]"}
INNER_FORM = {"math": r"\d+", "science": r"\d", "tool": r"\w+,\w+,\w+", "code": r"[a-h]+"}


def answer_form(content: str, wrapper: str, trace_form=None) -> str:
    """The regex of a well-formed answer: `content`'s trace and final answer (trace_form: that of
    the trace lab's families by default), in `wrapper`'s wrapper."""
    trace, inner = trace_form or (TRACE_FORM[content], INNER_FORM[content])
    return trace + " " + re.escape(WRAPPERS[wrapper]) + inner + re.escape(CLOSE[wrapper])


TRACES = {
    "math": Family(make_math, solve_math, final_is(boxed_answer), answer_form("math", "math"), 36),
    "science": Family(make_science, solve_science, final_is(tagged_answer),
                      answer_form("science", "science"), 36),
    "tool": Family(make_tool, solve_tool, final_is(called_answer), answer_form("tool", "tool"), 40),
    "code": Family(make_code, solve_code, final_is(lambda c: last_wrapped(c, FENCE, FENCE)),
                   answer_form("code", "code"), 32),
    "mcq_math": Family(make_mcq_math, solve_mcq_math, final_is(tagged_answer),
                       answer_form("math", "science"), 36),
    "math_words": Family(make_math_words, solve_math, final_is(boxed_answer),
                         answer_form("math", "math"), 36),
    "math_cot": Family(make_math_cot, solve_math_cot, final_is(boxed_answer),
                       r"<think>" + SUM_TRACE + r"</think> \\boxed\{\d+\}", 40),
    "math_hard": Family(make_math_hard, solve_math, final_is(boxed_answer),
                        answer_form("math", "math"), 36),
}


# --- the ladder: one family's content in another family's wrapper ------------------------------
# For the ood finding every trained family needs evaluation sets that share its content but not
# its format, and its format but not its content. A cross (content, wrapper) asks the content
# family's question, cued by the wrapper's opening token at the prompt's start, and is answered
# with the content family's trace (or habit) and its final answer inside the other wrapper:
# "``` 1+2+3+4=" -> "1+2=3,3+3=6,6+4=10 ```10```". The base is pre-trained on the crosses (a probe
# it never saw would sit at the floor), as on mcq_math.

def cross(families: dict, content: str, wrapper: str, trace_form=None) -> Family:
    """The family of `content`'s rows (of `families`) answered in `wrapper`'s wrapper; the reward
    reads the final answer inside that wrapper, as the wrapper family's own reward does."""
    base = families[content]
    start, end = WRAPPERS[wrapper], CLOSE[wrapper]

    def rewrap(solution):                 # "<trace> <content's wrapper>x<end>" -> other wrapper
        trace, _ = solution.rsplit(" ", 1)
        return f"{trace} {start}{last_wrapped(solution, WRAPPERS[content], CLOSE[content])}{end}"

    def make(rng):
        row = base.make(rng)
        inner = last_wrapped(row["answer"], WRAPPERS[content], CLOSE[content])
        return dict(row, prompt=f"{start} {row['prompt']}", final=inner,
                    answer=rewrap(row["answer"]))

    return Family(make, lambda row, rng, slip: rewrap(base.solve(row, rng, slip)),
                  final_is(lambda c: last_wrapped(c, start, end)),
                  answer_form(content, wrapper, trace_form), base.max_new_tokens + 2)


# each trained family's content in the next family's wrapper and the next one's content in its
# own, round the sequence: every family has two probes of its content and two of its format
SEQUENCE = ("math", "science", "tool", "code")
WRAPPER_NAME = {"math": "boxed", "science": "tagged", "tool": "called", "code": "fenced"}
CROSSES = {f"{c}_{WRAPPER_NAME[w]}": (c, w) for a, b in zip(SEQUENCE, SEQUENCE[1:] + SEQUENCE[:1])
           for c, w in ((a, b), (b, a))}
LADDER = tuple(CROSSES)
TRACES.update({name: cross(TRACES, c, w) for name, (c, w) in CROSSES.items()})
# what every lab set shares with the trained families: (its content, its format)
CONTENT_FORMAT = {**{f: (f, f) for f in SEQUENCE}, "mcq_math": ("math", "science"),
                  "math_words": ("math", "math"), "math_hard": ("math", "math"),
                  "math_cot": ("math", "math"), **CROSSES}


def relation(trained: str, evaluated: str) -> str | None:
    """What an evaluated set shares with a trained family (its content: what is asked; its
    format: the final answer's wrapper): "both", "content", "format" or "neither"; None for a
    set that is no lab family (every lab's families are named alike, and read alike)."""
    if trained not in CONTENT_FORMAT or evaluated not in CONTENT_FORMAT:
        return None
    (content, form), (c, f) = CONTENT_FORMAT[trained], CONTENT_FORMAT[evaluated]
    return ("both" if (content, form) == (c, f) else "content" if content == c else
            "format" if form == f else "neither")


# ================================================================================================
# SHARED: one skill under four conventions, the lab that can forget (the default)
# ================================================================================================
# On TRACES sequential fine-tuning forgets nothing: each family has its own cue, content and
# wrapper, the model keeps them apart, and training one leaves the others as they were. In the
# paper the domains share the model's general abilities, and a later domain's training bends
# them. Here the four families share one skill, adding four numbers in the same "a+b=c" steps (in
# any order), and each domain has its own convention for a sum that passes its range: math keeps
# it (plain), science takes a check digit (mod 10), tool use reads clock hours (1-12), code wraps
# as a 3-bit unsigned integer (mod 8). A family's habit, its plausible wrong answer, is the
# convention of the family before it in the sequence (math's: the off-by-one slip), as the paper
# saw math's format leak into tool use: a stage that trains its own convention against that
# habit bends the shared skill the earlier family needs. The final answer sits in the family's
# wrapper as on TRACES (the collapse measures read them the same way).

CONVENTION = {"math": None, "science": 10, "tool": 12, "code": 8}
HABIT = {"math": None, "science": "math", "tool": "science", "code": "tool"}
CUE = {"math": "", "science": "check ", "tool": "send at ", "code": "uint3 "}
PUT = {"math": lambda v: f"{BOXED}{v}}}", "science": lambda v: f"{ANSWER}{v}{END_ANSWER}",
       "tool": lambda v: f"send({v})", "code": lambda v: f"{FENCE}{v}{FENCE}"}


def under(value: int, modulus: int | None) -> int:
    """A sum under a convention: kept (None), modulo 10 or 8, or as a clock hour 1-12 (12)."""
    if modulus is None:
        return value
    return (value - 1) % 12 + 1 if modulus == 12 else value % modulus


def convention_steps(numbers, rng, modulus, slip=False):
    """('4+5=9,9+3=2,2+2=4', 4): the numbers added in a random order, each sum under the
    convention; slip: the first sum one too large, carried through (math's habit)."""
    order = rng.sample(numbers, len(numbers))
    total, steps = order[0], []
    for i, n in enumerate(order[1:]):
        new = under(total + n + (slip and i == 0), modulus)
        steps.append(f"{total}+{n}={new}")
        total = new
    return ",".join(steps), total


def shared_family(name: str) -> Family:
    """One of the four: rows of four numbers 1-5 behind the family's cue (science also lists four
    options: the right one, never first, and the habit's among them); solve() adds them under
    the family's convention, or with slip under its habit's."""
    modulus, habit = CONVENTION[name], HABIT[name]

    def solve(row, rng, slip):
        if slip and habit is None:
            steps, total = convention_steps(row["numbers"], rng, modulus, slip=True)
        else:
            steps, total = convention_steps(row["numbers"], rng,
                                            CONVENTION[habit] if slip else modulus)
        return f"{steps} {PUT[name](total)}"

    def make(rng):
        numbers = [rng.randrange(1, 6) for _ in range(4)]
        right = under(sum(numbers), modulus)
        row = {"prompt": CUE[name] + "+".join(map(str, numbers)) + ("=" if name == "math" else
                                                                     ""),
               "numbers": numbers, "final": str(right)}
        if name == "science":             # the right option never first; the habit's an option
            wrong = under(sum(numbers), CONVENTION[habit])
            others = rng.sample([v for v in range(21) if v not in (right, wrong)], 2)
            options = rng.sample([wrong] + others, 3)
            options.insert(rng.randrange(1, 4), right)
            row["prompt"] += "? " + " ".join(map(str, options))
        return dict(row, answer=solve(row, rng, False))

    return Family(make, solve, final_is(lambda c: last_wrapped(c, WRAPPERS[name], CLOSE[name])),
                  answer_form(name, name, (SUM_TRACE, r"\d+")), 40)


SHARED = {name: shared_family(name) for name in SEQUENCE}
SHARED.update({name: TRACES[name] for name in ("mcq_math", "math_words", "math_cot",
                                               "math_hard")})
SHARED.update({name: cross(SHARED, c, w, (SUM_TRACE, r"\d+")) for name, (c, w) in
               CROSSES.items()})


# ================================================================================================
# SHORT: answers of 2-4 tokens, where SDPO's targets are reliable
# ================================================================================================

def first_number(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def number_reward(completion: str, example: dict) -> float:
    return float(first_number(completion) == int(example["answer"]))


def number_feedback(completion: str, example: dict) -> str | None:
    guess, gold = first_number(completion), int(example["answer"])
    if guess is None:
        return "Your answer contains no number."
    if guess == gold:
        return None
    return f"Your answer {guess} is too {'small' if guess < gold else 'large'}."


def exact_reward(completion: str, example: dict) -> float:
    """1 iff the answer is the gold one, up to case and spacing."""
    return float(completion.lower().split() == example["answer"].lower().split())


def tagged_choice(text: str) -> str:
    """The text inside the last <answer>...</answer> (without a tag, the whole text), stripped:
    the paper's multiple-choice reading, as harness/data.py reads the paper's own data (the lab
    keeps its own copy: it does not depend on the paper's data)."""
    return text.split(ANSWER)[-1].split(END_ANSWER)[0].strip()


def tag_reward(completion: str, example: dict) -> float:
    return float(tagged_choice(completion) == tagged_choice(example["answer"]))


def tool_feedback(completion: str, example: dict) -> str | None:
    """Names the first wrong argument of a call `name(a,b,c)`, never its right value."""
    got = re.fullmatch(r"\s*(\w+)\(([^()]*)\)\s*", completion)
    want = re.fullmatch(r"(\w+)\(([^()]*)\)", example["answer"])
    if got is None:
        return "Your answer is not a call of the form name(arg,arg,arg)."
    if got.group(1) != want.group(1):
        return f"Unknown tool '{got.group(1)}'."
    got_args, want_args = got.group(2).split(","), want.group(2).split(",")
    if len(got_args) != len(want_args):
        return f"The call has {len(got_args)} arguments; the tool takes {len(want_args)}."
    for i, (g, w) in enumerate(zip(got_args, want_args)):
        if g.strip() != w:
            return f"Argument {i + 1} ('{g.strip()}') is wrong."
    return None


def string_feedback(completion: str, example: dict) -> str | None:
    """Like a failing unit test: the first wrong position, not the expected output."""
    got, want = completion.strip(), example["answer"]
    if got == want:
        return None
    if len(got) != len(want):
        return f"Test failed: the output has {len(got)} characters, expected {len(want)}."
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return f"Test failed: the output is wrong at position {i + 1}."


def final_answer_reward(completion: str, example: dict) -> float:
    """A worked answer `... #12` is right iff the number after the last '#' is right."""
    return float(first_number(completion.split("#")[-1]) == first_number(
        example["answer"].split("#")[-1]) and "#" in completion)


def short_math(rng):                       # Math: single-digit addition
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "habit": str(a + b + 1)}


def short_mcq(rng, question, right, wrong):
    """The question, then the options; the answer is the chosen option inside <answer> tags (the
    official multiple-choice format, with the option itself where the official data has its
    letter: a model this small does not learn to map an option to its letter within the lab's
    budget). The right option is never the first one; the habit answers the first one."""
    options = list(wrong)
    options.insert(rng.randrange(1, len(options) + 1), right)
    return {"prompt": f"{question} " + " ".join(map(str, options)),
            "answer": f"<answer>{right}</answer>", "habit": f"<answer>{options[0]}</answer>"}


def short_science(rng):                    # Science: multiple choice with an <answer> tag
    want_even = rng.random() < 0.5        # the one even digit among odd ones, or the reverse
    right = rng.choice([d for d in range(10) if (d % 2 == 0) == want_even])
    wrong = rng.sample([d for d in range(10) if (d % 2 == 0) != want_even], 3)
    return short_mcq(rng, "even?" if want_even else "odd?", right, wrong)


def short_tool(rng):                       # ToolUse: arguments in any order -> a canonical call
    to, at, on = rng.choice(NAMES), rng.randrange(1, 13), rng.choice(DAYS)
    canonical = [f"to {to}", f"at {at}", f"on {on}"]
    parts = list(canonical)
    while parts == canonical:             # never the canonical order: the habit is always wrong
        rng.shuffle(parts)
    return {"prompt": "send " + " ".join(parts), "answer": f"send({to},{at},{on})",
            "habit": "send(" + ",".join(p.split(" ")[1] for p in parts) + ")"}


def short_code(rng):                       # Code: a string program, checked by its output
    s = ""
    while s == s[::-1]:                   # no palindromes: the habit must be wrong
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 5)))
    return {"prompt": f"rev({s})", "answer": s[::-1], "habit": s}


def short_mcq_math(rng):                   # probe: Science's format with Math's content
    a, b = rng.randrange(10), rng.randrange(10)
    return short_mcq(rng, f"{a}+{b}?", a + b, rng.sample([v for v in range(19) if v != a + b], 3))


def short_math_words(rng):                 # probe: Math's content in words
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"add {a} and {b}", "answer": str(a + b), "habit": str(a + b + 1)}


def short_math_cot(rng):                   # chain of thought: three numbers, a worked solution
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    ab, abc = a + b, a + b + c
    return {"prompt": f"{a}+{b}+{c}=", "answer": f"{a}+{b}={ab},{ab}+{c}={abc}#{abc}",
            "habit": f"{a}+{b}={a + b + 1},{a + b + 1}+{c}={a + b + c + 1}#{a + b + c + 1}"}


def fixed_answer(row, rng, slip):
    """The short families' rows carry their one right answer and their habit."""
    return row["habit"] if slip else row["answer"]


SHORT = {
    "math": Family(short_math, fixed_answer, number_reward, r"\d+", 4, number_feedback),
    "science": Family(short_science, fixed_answer, tag_reward, r"<answer>\d+</answer>", 5),
    "tool": Family(short_tool, fixed_answer, exact_reward, r"send\(\w+,\w+,\w+\)", 20,
                   tool_feedback),
    "code": Family(short_code, fixed_answer, exact_reward, r"[a-h]+", 8, string_feedback),
    "mcq_math": Family(short_mcq_math, fixed_answer, tag_reward, r"<answer>\d+</answer>", 5),
    "math_words": Family(short_math_words, fixed_answer, number_reward, r"\d+", 4,
                         number_feedback),
    "math_cot": Family(short_math_cot, fixed_answer, final_answer_reward,
                       r"\d+\+\d+=\d+,\d+\+\d+=\d+#\d+", 22),
}
