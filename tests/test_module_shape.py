"""sdpo_cl.py is the methods alone, in reading order: a student reads it top to bottom without
scrolling ahead, and never meets the lab, the data, the run folders or the reports there."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = (ROOT / "sdpo_cl.py").read_text()
TREE = ast.parse(SOURCE)
PROJECT = {"sdpo_cl", "run_sequence", "eval_forgetting", "harness"}


def top_level_names():
    """name -> the line where the module first binds it (defs, classes, assignments)."""
    lines = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            lines.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        lines.setdefault(name.id, node.lineno)
    return lines


def definitions():
    """Every function and class at the top level, with the methods of each class."""
    return [node for node in TREE.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def test_no_function_uses_a_name_defined_further_down():
    defined = top_level_names()
    late = [f"{node.name} (line {node.lineno}) uses {name.id} (line {defined[name.id]})"
            for node in definitions() for name in ast.walk(node)
            if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load)
            and defined.get(name.id, 0) > node.lineno]
    assert late == []


def test_it_imports_no_other_module_of_the_project():
    main_block = [node for node in TREE.body if isinstance(node, ast.If)]   # __main__ may
    imported = [alias.name.split(".")[0] for node in ast.walk(TREE)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                and not any(node in ast.walk(block) for block in main_block)
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])]
    assert PROJECT.isdisjoint(imported)


def test_it_fits_an_evening():
    lines = SOURCE.splitlines()
    starts = {node.name: node.lineno for node in definitions()}
    assert len(lines) <= 1200
    assert starts["grpo_advantages"] <= 120 and starts["sdpo_loss"] <= 300
    config = next(node for node in definitions() if node.name == "Config")
    assert config.end_lineno - config.lineno + 1 <= 100
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1}" for node in ast.walk(TREE)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40]
    assert long == []


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*.py"))
                         + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("harness/*.py")))
def test_no_module_imports_one_that_imports_it_back(path):
    def imports(rel):
        tree = ast.parse((ROOT / rel).read_text())
        out = set()
        for node in tree.body:      # module-level imports only: what runs when it is imported
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                out |= ({f"{node.module}.{a.name}" for a in node.names}
                        if node.module == "harness" else {node.module})
        return {m.replace(".", "/") + ".py" for m in out
                if m.split(".")[0] in PROJECT and (ROOT / (m.replace(".", "/") + ".py")).exists()}

    seen, stack = set(), [(dep, [path]) for dep in imports(path)]
    while stack:
        module, chain = stack.pop()
        assert module != path, " -> ".join(chain + [module])
        if module not in seen:
            seen.add(module)
            stack += [(dep, chain + [module]) for dep in imports(module)]


def project_imports(rel) -> set:
    """The project modules `rel` imports anywhere in it (functions included)."""
    tree = ast.parse((ROOT / rel).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= ({f"{node.module}.{a.name}" for a in node.names}
                      if node.module == "harness" else {node.module})
    return {m for m in found if m.split(".")[0] in PROJECT}


def test_each_floor_imports_only_the_floors_below():
    """The core (sdpo_cl.py), the support folder (harness/), the reports (eval_forgetting.py),
    the driver (run_sequence.py): no file imports one on its own floor's level above it (the
    walkthrough's __main__ hook in sdpo_cl.py aside: test_it_imports_no_other_module...)."""
    for rel in sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("harness/*.py")):
        assert not project_imports(rel) & {"run_sequence", "eval_forgetting"}, rel
    assert project_imports("eval_forgetting.py") == {"harness.files"}   # atomic writes only
    assert "run_sequence" not in project_imports("eval_forgetting.py")


def test_the_reports_load_no_model():
    """eval_forgetting.py reads run folders: it imports neither torch nor transformers."""
    tree = ast.parse((ROOT / "eval_forgetting.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not modules & {"torch", "transformers", "sdpo_cl", "peft"}


def test_importing_the_reports_imports_no_torch_at_all():
    """Not even through a helper it imports: a report runs where no torch is installed."""
    code = "import sys, eval_forgetting; print(sorted({'torch', 'transformers', 'sdpo_cl'} & " \
           "set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
