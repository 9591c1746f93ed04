"""Nested-dict helpers of the config tree: dotted keys in and out, merging, and applying one
``section.key=value`` override (the one override applier of the config files and the command line).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from decode_accel.errors import DecodeAccelError


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {'a.b.0.c': scalar}; None becomes 'null' so trackers accept it."""
    out: dict[str, Any] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)) and len(v) > 0:
            out.update(flatten_dict(v if not isinstance(v, tuple) else list(v), key + "."))
        elif isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(v)
        elif v is None:
            out[key] = "null"
        else:
            out[key] = v
    return out


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
