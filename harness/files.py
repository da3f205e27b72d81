"""Files that a crash cannot leave half-written, and strict JSON: the standard library alone, so
that the reports (eval_forgetting.py) read and write run folders without importing torch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def strict_json(obj):
    """obj with every non-finite float replaced by None, so that json.dumps writes strict JSON
    (a bare NaN is not JSON, and other readers refuse it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write(path, content):
    """Write a file so that a crash leaves the old file or the new one, never half of one:
    content (text, or a function that writes a given path) goes to a temporary file that is then
    renamed over the target (harness/runs.py's save_stage does the same for a whole folder)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    content(tmp) if callable(content) else tmp.write_text(content)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    """Strict JSON (no bare NaN), written atomically."""
    atomic_write(path, json.dumps(strict_json(obj), indent=1, allow_nan=False))
