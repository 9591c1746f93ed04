"""Nested-dict helpers of the config tree: dotted keys in and out, merging, and applying one
``section.key=value`` override (the one override applier of the config files and the command line).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from decode_accel.errors import DecodeAccelError
from decode_accel.io._json import to_json_data


def flatten_dict(tree: Mapping, prefix: str = "", *, scalars: bool = False) -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: ``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``.

    The one dict flattener. Leaves (lists too) are kept as they are and an empty mapping stays a leaf, so
    the result reads as dotted overrides (a curriculum stage's simulation). With ``scalars`` every leaf is
    a value that trackers take as a hyper-parameter (TensorBoard rejects nested ones): lists and mappings
    as JSON text, None as ``"null"``, numpy/torch numbers as Python numbers, other objects as text.
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_dict(v, key + ".", scalars=scalars))
        else:
            out[key] = _hparam(v) if scalars else v
    return out


def _hparam(value: Any) -> Any:
    value = to_json_data(value, nonfinite="keep", default=str)
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def undot(d: dict) -> dict:
    """{'a.b': 1, 'c': {'d.e': 2}} -> {'a': {'b': 1}, 'c': {'d': {'e': 2}}}."""
    out: dict = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = undot(value)
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge recursively, everything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        return text  # e.g. 'a: b' fragments: keep the literal string


def apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise DecodeAccelError(f"override '{override}' has no '='", field="overrides",
                               fix="write section.key=value, e.g. training_strategy.epochs=5")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(p == "" for p in key.split(".")):
        raise DecodeAccelError(f"override '{override}' has an empty key", field="overrides",
                               fix="write section.key=value")
    value = _parse_scalar(raw)
    parts = key.split(".")
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            idx = _list_index(p, node, ".".join(parts[:i + 1]))
            node = node[idx]
            continue
        nxt = node.get(p)
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            node[p] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        raise DecodeAccelError(f"'{part}' is not an index of a list of {len(node)} entries", field=where,
                               fix="use 0-based integer indices for list entries") from None
