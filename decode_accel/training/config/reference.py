"""The config reference (Markdown) generated from the field descriptions of ``TrainingConfig``, so that the
README's table and the code cannot drift apart (``decode-accel config-reference``).
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Literal, Union

from pydantic import BaseModel

from decode_accel.training.config.sections import TrainingConfig, inner_model


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if inspect.isclass(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_text(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return ""
        if isinstance(value, BaseModel):
            return ""
        return json.dumps(value)
    if field.is_required():
        return "required"
    return json.dumps(field.default) if not isinstance(field.default, float) else repr(field.default)


def config_reference_markdown() -> str:
    """The config reference (Markdown table) generated from the field descriptions of ``TrainingConfig``.

    One row per leaf field, named by its dotted path, with type, default and description (unit).
    """
    rows = ["| field | type | default | meaning (unit) |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            inner = inner_model(field.annotation)
            dotted = f"{prefix}{name}"
            if inspect.isclass(inner) and issubclass(inner, BaseModel):
                origin = typing.get_origin(field.annotation)
                suffix = ".N." if origin is list else (".NAME." if origin is dict else ".")
                rows.append(f"| **{dotted}** | section | | {field.description or ''} |")
                walk(inner, dotted + suffix)
            else:
                desc = (field.description or "").replace("|", "\\|")
                rows.append(f"| {dotted} | {_type_name(field.annotation)} | {_default_text(field)} | {desc} |")

    walk(TrainingConfig, "")
    return "\n".join(rows) + "\n"
