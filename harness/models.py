"""Loading models: a hub id, a local folder or a GGUF file; the offline check that makes a
missing model fail in seconds; the device; and prompts that do not fit the model's context."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from sdpo_cl import format_prompt, generation_budget, teacher_prompt


def resolve_device(device: str, model: str) -> str:
    """'auto': the lab on the CPU (too small for a GPU to help), other models on CUDA when there
    is one; 'cpu' and 'cuda' as given."""
    if device == "auto":
        return "cuda" if model not in ("lab", "lab-short") and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch has no CUDA device to use (a CPU build, or "
                         "no GPU visible); allowed here: cpu or auto")
    return device


def load_pretrained(name: str, device: str = "cpu"):
    """(model, tokenizer) for a hub id, a local folder, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    path = Path(name)
    if path.suffix == ".gguf":       # transformers de-quantises GGUF weights (needs `gguf`)
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: no such GGUF file")
        kwargs = {"gguf_file": path.name}
    elif not path.exists():          # a hub id
        offline_unless_reachable(f"the model {name!r}")
    source = str(path.parent) if kwargs else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except Exception as e:          # a missing id, a damaged file (safetensors' own error), ...
        raise ValueError(f"model {name!r} could not be loaded: allowed are 'lab', 'lab-trace', "
                         f"'lab-short', a hub id, a "
                         f"folder saved with save_pretrained, or a .gguf file ({e})") from e
    if kwargs:   # GGUF: the weights are de-quantised fp32 tensors now, but transformers still
        # marks the model as GGUF-quantised and would refuse save_pretrained (checkpoints)
        # and training in transformers' Trainer (the TRL benchmark)
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token_id is None:   # batched generation needs a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_encoder(name: str, device: str = "cpu"):
    """(model, tokenizer) of any transformers encoder (a hub id or a folder), for embedding
    task sets (harness/measures.py set_embeddings): its last hidden state is what is read."""
    from transformers import AutoModel, AutoTokenizer
    if not Path(name).exists():
        offline_unless_reachable(f"the embedding model {name!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name, dtype=torch.float32)
    except Exception as e:
        raise ValueError(f"--embedding-model {name!r} could not be loaded: allowed are a hub id "
                         f"or a folder of a transformers model ({type(e).__name__})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


def offline_unless_reachable(what: str, timeout: float = 3.0):
    """Without a network, the hub libraries retry for most of a minute before they give up.
    When the hub cannot be reached, switch them to offline mode (the local cache only) at once,
    so a missing model or data set fails in seconds with a clear message."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        import datasets.config
        import huggingface_hub.constants
        print(f"note: {host} cannot be reached; looking for {what} in the local cache only "
              f"(as with HF_HUB_OFFLINE=1)")
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True


def cache_dir() -> Path:
    return Path(os.environ.get("SDPO_CL_CACHE", Path.home() / ".cache" / "sdpo_cl"))


def fit_prompts(task, tokenizer, model, cfg, with_teacher=False, on_long="error") -> str | None:
    """Check that every prompt fits the model's context with the generation budget (and, with
    with_teacher, the SDPO teacher's prompt: the template and a demonstration as long as the
    budget). on_long: 'error' (refuse, naming how many rows and the longest), 'drop' or
    'truncate' (cut the prompt's end). Returns a note on what was done, or None."""
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = generation_budget(cfg, task)
    if not limit:
        return None

    def lengths(prompts, systems):      # tokens of each prompt as the model sees it, one call
        texts = [format_prompt(tokenizer, p, s, cfg.enable_thinking)
                 for p, s in zip(prompts, systems)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

    notes = []
    for split in ("train", "test"):
        data = getattr(task, split)
        rows = list(data)                  # a dataset decodes each row on every pass: one
        prompts, systems = [ex["prompt"] for ex in rows], [ex.get("system") for ex in rows]
        needs = [n + budget for n in lengths(prompts, systems)]
        if with_teacher:           # the template and a demonstration as long as the budget
            teacher = lengths([teacher_prompt(p, cfg, "") for p in prompts], systems)
            needs = [max(n, t + 2 * budget) for n, t in zip(needs, teacher)]
        over = [i for i, n in enumerate(needs) if n > limit]
        if not over:
            continue
        what = (f"task {task.name!r}: {len(over)} of {len(needs)} {split} prompts do not fit "
                f"the model's context ({limit} positions with a generation budget of {budget}"
                f"{' and the SDPO teacher prompt' if with_teacher else ''}); the longest needs "
                f"{max(needs)}")
        if on_long == "error":
            raise ValueError(what + "; drop them with --long-prompts drop, or cut them with "
                                    "--long-prompts truncate")
        if on_long == "drop":
            data = data.select([i for i in range(len(data)) if needs[i] <= limit])
            if len(data) == 0:
                raise ValueError(what + "; none would be left")
        else:
            excess = {i: needs[i] - limit for i in over}
            data = data.map(lambda ex, i: {"prompt": tokenizer.decode(tokenizer(
                ex["prompt"], add_special_tokens=False).input_ids[:-excess[i]])}
                if i in excess else {}, with_indices=True)
        setattr(task, split, data)
        notes.append(what + f": {'dropped' if on_long == 'drop' else 'cut to fit'}")
    return "; ".join(notes) or None
