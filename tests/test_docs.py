"""The docs agree with the code: every relative link and anchor in README.md and docs/ resolves
(a file that exists, a heading that is there), and every command they show parses with the
script's own command line (argparse, nothing runs), so a change cannot leave them stale."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("run_sequence.py", "eval_forgetting.py", "sdpo_cl.py", "benchmarks/bench_step.py",
           "benchmarks/drift_null.py", "benchmarks/lab_properties.py",
           "benchmarks/real_model.py", "benchmarks/checkpoint_overhead.py")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


FENCED = re.compile(r"^\s*```.*?^\s*```", re.DOTALL | re.MULTILINE)   # blocks, not inline ```


def anchors(page: Path) -> set:
    text = re.sub(FENCED, "", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def links(page: Path) -> list:
    """Every relative link target of a page (images too), without code spans and blocks."""
    text = re.sub(FENCED, "", page.read_text())
    text = re.sub(r"`[^`]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    assert broken == []


def commands(page: Path) -> list:
    """The commands a page shows: lines of its code blocks, and inline code, that start with
    `python <one of SCRIPTS>` (in a block, the script alone too), continuation lines joined,
    comments cut."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        found += block.replace("\\\n", " ").splitlines()
    found += [" ".join(span.split()) for span in          # inline: `python script ...` only
              re.findall(r"(?<!`)`(python [^`]+)`(?!`)",
                         re.sub(FENCED, "", text))]
    out = []
    for line in found:
        words = line.split("#")[0].split()
        if words[:1] == ["python"]:
            words = words[1:]
        if words and words[0] in SCRIPTS:
            out.append(words)
    return out


def parser(script: str):
    """The script's argparse parser, imported without running it."""
    name = script.replace("/", ".")[:-3]
    if script.startswith("benchmarks/"):
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT))
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(name)
    return module.build_parser() if hasattr(module, "build_parser") else None


SHOWN = sorted({(page.name, " ".join(words)) for page in PAGES for words in commands(page)})


def test_the_pages_show_commands():
    assert len(SHOWN) >= 20


def filled(ap, words) -> list:
    """A placeholder (<...>, or a word in capitals such as NAME) read as a value its option
    allows: the option's first choice where it has choices, else a path."""
    out = []
    for word in words:
        if re.fullmatch(r"x|[A-Z]+", word) and out and out[-1].startswith("--"):
            option = ap._option_string_actions.get(out[-1]) if out else None
            word = option.choices[0] if option is not None and option.choices else "x"
        out.append(re.sub(r"<[^>]*>", "x", word))
    return out


@pytest.mark.parametrize("page, command", SHOWN)
def test_every_command_shown_parses(page, command):
    words = shlex.split(re.sub(r"<[^>]*>", "x", command))    # a placeholder: a path
    if words[0] == "sdpo_cl.py":
        assert words == ["sdpo_cl.py"]                   # it takes no arguments
        return
    ap = parser(words[0])
    if "--help" in words or "-h" in words:
        with pytest.raises(SystemExit) as done:
            ap.parse_args(filled(ap, words[1:]))
        assert done.value.code == 0
        return
    ap.parse_args(filled(ap, words[1:]))
