"""JSON data: the one sanitiser of the package (:func:`to_json_data`) and the atomic JSON file write.

Every room that stores results, logs, configs or checkpoint state as JSON goes through
:func:`to_json_data`: mappings (keys as text), lists, tuples and sets become dicts and lists, numpy
scalars and 0-d arrays/tensors become Python numbers, arrays and tensors nested lists, paths text,
pydantic models their JSON dump. Non-finite floats become ``null`` by default (strict JSON that any
reader parses); the training log writes them as the strings ``"nan"``/``"inf"``/``"-inf"`` (so a diverged
loss stays visible), and checkpoints keep them (Python's ``json`` writes and reads ``NaN``/``Infinity``,
so a state with an infinite "best so far" resumes unchanged).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from decode_accel.io._atomic import atomic_write_text

NonFinite = Literal["null", "text", "keep"]


def _float(value: float, nonfinite: NonFinite) -> Any:
    value = float(value)  # numpy's float64 is a float subclass: a plain float for every writer
    if math.isfinite(value) or nonfinite == "keep":
        return value
    if nonfinite == "text":
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return None


def to_json_data(obj: Any, *, nonfinite: NonFinite = "null", default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as plain JSON data (dict, list, str, int, float, bool, None).

    Args:
        obj: nested mappings, sequences, sets, numbers (Python, numpy, 0-d arrays/tensors), numpy arrays,
            torch tensors, paths and pydantic models.
        nonfinite: what NaN and +-inf become: ``"null"`` (None), ``"text"`` ("nan", "inf", "-inf") or
            ``"keep"`` (the float itself; only Python's own json reads it back).
        default: called on any other object (e.g. ``str``); None: such an object is a TypeError.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return _float(obj, nonfinite)
    if isinstance(obj, Mapping):
        return {str(k): to_json_data(v, nonfinite=nonfinite, default=default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_data(v, nonfinite=nonfinite, default=default) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "model_dump"):  # a pydantic model (a config section)
        return to_json_data(obj.model_dump(mode="json"), nonfinite=nonfinite, default=default)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalars and arrays, torch tensors
        if getattr(obj, "device", None) is not None and hasattr(obj, "detach"):
            obj = obj.detach().cpu()
        return to_json_data(obj.tolist(), nonfinite=nonfinite, default=default)
    if default is not None:
        return to_json_data(default(obj), nonfinite=nonfinite)
    raise TypeError(f"{type(obj).__name__} is not JSON data")


def write_json(data: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write ``to_json_data(data)`` (NaN -> null) to ``path`` atomically (folders are created); returns ``path``.

    Raises:
        TypeError: ``data`` holds an object that is not JSON data.
        DecodeAccelError: the file cannot be written (one line naming it).
    """
    text = json.dumps(to_json_data(data), indent=indent, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return Path(path)
