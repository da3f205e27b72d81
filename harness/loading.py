"""Tasks and models by name, for the driver, the measures and the benchmarks alike.

    load_task("math")                         a family of the lab (or of lab-short)
    load_task("gsm8k"), load_task("sciknoweval:chemistry")    the hub (cached)
    load_task("path/to/folder")               the official SDPO layout: train.json, test.json
    load_policy("lab"), load_policy("HuggingFaceTB/SmolLM2-135M-Instruct"), a folder, a .gguf
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sdpo_cl import Task
from harness import data, lab, models


def load_task(name: str, model: str = "lab") -> Task:
    """A task by name: a family of the lab `model` runs on (the default lab's families for a real
    model), `gsm8k` or `sciknoweval:<domain>` (from the hub), or a folder in the official SDPO
    layout (train.json and test.json)."""
    lab_name = model if model in lab.LABS else "lab"
    families = lab.LABS[lab_name].families
    if name in families:
        return lab.make_lab_task(name, lab_name)
    if name == "gsm8k":
        return data.load_gsm8k()
    if name.startswith("sciknoweval:"):
        return data.load_sciknoweval(name.split(":", 1)[1], models.cache_dir() / "data")
    if Path(name).is_dir():
        return data.load_official_task(name)
    if "/" in name or "\\" in name or name.startswith((".", "~")):
        raise ValueError(f"task folder {name!r} does not exist (a task folder holds train.json "
                         f"and test.json in the official SDPO layout)")
    if name == "tooluse":
        raise ValueError("task 'tooluse': ToolAlpaca as the paper used it is not on the hub; its "
                         "files are datasets/tooluse/{train,test}.json of "
                         "github.com/Moenupa/SDPO-CL: pass their folder")
    raise ValueError(f"unknown task {name!r}: allowed are the lab families "
                     f"{', '.join(families)}, 'gsm8k', 'sciknoweval:<domain>' (domains "
                     f"{', '.join(data.SCIKNOWEVAL_DOMAINS)}), or a folder with train.json and "
                     f"test.json")


def load_policy(name: str, device: str = "cpu", lab_steps: int | None = None):
    """(model, tokenizer) for a lab (its shipped base, or one pre-trained for `lab_steps`
    steps), a hub id, a local folder, or a .gguf file."""
    if name in lab.LABS:
        recipe = lab.LABS[name].recipe
        if lab_steps is not None:
            recipe = dataclasses.replace(recipe, steps=lab_steps)
        model, tokenizer = lab.lab_base(recipe)
        return model.to(device), tokenizer
    return models.load_pretrained(name, device)
