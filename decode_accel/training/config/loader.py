"""Loading and saving the training config: YAML/JSON files with ``base:`` inheritance, dotted overrides,
and one ``DecodeAccelError`` that lists every problem at once (with "did you mean" for unknown keys).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from decode_accel.errors import DecodeAccelError
from decode_accel.io._atomic import atomic_write_text
from decode_accel.training.config.dicts import apply_override, deep_merge
from decode_accel.training.config.sections import TrainingConfig, _suggest, inner_model


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DecodeAccelError("config file not found", path=path, fix="check the path") from None
    except OSError as err:
        raise DecodeAccelError(f"cannot read config file: {err.strerror}", path=path) from None
    except UnicodeDecodeError as err:
        raise DecodeAccelError(f"not a UTF-8 text file (byte {err.start})", path=path,
                               fix="give a YAML or JSON config file") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif isinstance(err, json.JSONDecodeError):
            where = f" at line {err.lineno}, column {err.colno}"
        raise DecodeAccelError(f"not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}{where}",
                               path=path, fix="fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DecodeAccelError(f"the top level must be a mapping of sections, got {type(data).__name__}",
                               path=path, fix="write 'section: {key: value}' entries")
    return data


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path):], path))
        raise DecodeAccelError(f"config inheritance cycle {cycle}", path=chain[-1], field="base",
                               fix="remove one of the base: entries")
    data = _read_mapping(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise DecodeAccelError("base must be a file name or a list of file names", path=path, field="base")
    merged: dict = {}
    for b in bases:  # later bases win over earlier ones; the file itself wins over all
        merged = deep_merge(merged, _load_with_bases(path.parent / b, (*chain, path)))
    return deep_merge(merged, data)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class whose field ``loc[-1]`` is (None when the path leaves the typed tree)."""
    model: Any = TrainingConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (inspect.isclass(model) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = inner_model(model.model_fields[part].annotation)
    return model if inspect.isclass(model) and issubclass(model, BaseModel) else None


def _format_validation_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or
                                                                         p in ("constrained-str",))))
        # pydantic puts union alternatives and tagged names into loc; keep the config path only
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("dict", "list"))))
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            model = _model_at(loc)
            hint = _suggest(loc[-1], model.model_fields) if model is not None else ""
            lines.append(f"{dotted}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{dotted}: required value is missing")
        elif not dotted:  # cross-section problems name their fields themselves
            lines.extend(e["msg"].removeprefix("Value error, ").splitlines())
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            given = e.get("input")
            shown = "" if isinstance(given, (dict, list)) or e["type"].startswith("value_error") else \
                f" (got {given!r})"
            lines.append(f"{dotted}: {msg}{shown}")
    return lines


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read a YAML/JSON training config (with ``base:`` inheritance), apply dotted overrides, validate.

    Args:
        path: the config file, or None to start from the defaults.
        overrides: ``"section.key=value"`` strings; values are parsed as YAML scalars.

    Raises:
        DecodeAccelError: listing every problem found (first line: how many), with "did you mean"
            suggestions for unknown keys.
    """
    data = _load_with_bases(Path(path), ()) if path is not None else {}
    return load_config_data(data, overrides, source=os.fspath(path) if path is not None else None)


def load_config_data(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                     source: str | None = None) -> TrainingConfig:
    """``load_config`` for config data already read (a mapping of sections): overrides, then validation;
    ``source`` names it in the error (default "training config")."""
    data = copy.deepcopy(dict(data))  # a private copy the overrides may change
    for override in overrides or ():
        apply_override(data, override)
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as err:
        lines = _format_validation_errors(err)
        source = source or "training config"
        n = len(lines)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} in the training config (fix each key below)"
        raise DecodeAccelError("\n  ".join([head, *lines])) from None


def save_config(cfg: TrainingConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (YAML for .yaml/.yml, else JSON) atomically; ``load_config`` reads it back."""
    path = Path(path)
    data = cfg.to_dict()
    text = json.dumps(data, indent=2) + "\n" if path.suffix.lower() == ".json" else \
        yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)
    return path
