"""The configuration reference, generated from the pydantic models that validate a run config.

    python -m services.config_reference > deploy/configs/REFERENCE.md

Contract: `render()` walks `services.config.RunConfig` and every section model it contains
(unions such as `task`, and registered variants such as `learner.objective.advantage`, list each
variant under its `kind`), and writes one markdown table per
section with every field's dotted name, type, default, allowed values or bounds, and description.
Descriptions come from the fields themselves (`Field(description=...)`), so the reference cannot
drift from the code: `tests/unit/services/test_config_reference.py` regenerates it, compares it
with the checked-in file, and fails on a field without a description.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Every field of a run config (`deploy/configs/*.yaml`, or `section.field=value` overrides on the
command line), generated from the code by `python -m services.config_reference`; do not edit by hand.
Unknown keys, wrong types and values outside the bounds below are rejected at start-up (exit code 2)
with the dotted field named. Cross-field rules are checked too and name both fields.
"""


def _strip(annotation):
    """Drop `Annotated[...]` wrappers (discriminator tags, constraints)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _registry(field: FieldInfo):
    """The variant registry (`learner.variants.Registry`) a field validates through, if any."""
    return next((m for m in field.metadata if hasattr(m, "configs") and hasattr(m, "kinds")), None)


def _field_models(field: FieldInfo) -> list[type[BaseModel]]:
    registry = _registry(field)
    return registry.configs() if registry is not None else _models_in(field.annotation)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes a field holds directly (a section, or each variant of a union)."""
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if _is_union(annotation):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def type_name(annotation) -> str:
    """A short, readable name for a field's type (`int`, `float | None`, `list[str]`, `one of: a, b`)."""
    annotation = _strip(annotation)
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of: " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    if _is_union(annotation):
        return " \\| ".join(type_name(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        kind = annotation.model_fields.get("kind")
        return f"section (kind `{kind.default}`)" if kind is not None else "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of: " + ", ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def field_type_name(field: FieldInfo) -> str:
    registry = _registry(field)
    if registry is not None:
        kinds = ", ".join(f"`{k}`" for k in registry.kinds())
        return f"a kind, or a mapping `{{kind: ..., field: value}}`; kinds: {kinds}"
    return type_name(field.annotation)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None and _registry(field) is not None:
        return f'`"{field.default_factory().kind}"` with its defaults'
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that needs the validated data
            return "computed"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "section defaults"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def bounds_text(field: FieldInfo) -> str:
    """`>= 1`, `> 0, <= 1`, ... from the field's annotated-types constraints."""
    marks = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                marks.append(f"{sign} {value}")
    return ", ".join(marks)


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted prefix, model) for `model` and every section nested in it, depth first, in field order."""
    yield prefix, model
    for name, field in model.model_fields.items():
        subs = _field_models(field)
        for sub in subs:
            dotted = f"{prefix}{name}"
            kind = sub.model_fields.get("kind")
            if (len(subs) > 1 or _registry(field) is not None) and kind is not None:
                dotted = f"{dotted} (kind: {kind.default})"
            yield from sections(sub, dotted + ".")


def missing_descriptions(root: type[BaseModel] | None = None) -> list[str]:
    """Dotted names of fields that have no description (the reference test requires one on each)."""
    root = root or _run_config()
    return [
        f"{prefix}{name}"
        for prefix, model in sections(root)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]


def render(root: type[BaseModel] | None = None) -> str:
    root = root or _run_config()
    out = [HEADER]
    for prefix, model in sections(root):
        title = prefix.rstrip(".") or "(top level)"
        out.append(f"\n## `{title}`\n")
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc and model is not root:
            out.append(f"{doc}\n")
        out.append("| field | type | default | bounds | what it does |")
        out.append("|---|---|---|---|---|")
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(
                f"| `{prefix}{name}` | {field_type_name(field)} | {default_text(field)} | "
                f"{bounds_text(field)} | {description} |"
            )
    return "\n".join(out) + "\n"


def _run_config() -> type[BaseModel]:
    from services.config import RunConfig

    return RunConfig


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
