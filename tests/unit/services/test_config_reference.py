"""The configuration reference: every field described, and the checked-in file equal to what the code renders."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.config_reference import bounds_text, missing_descriptions, render, type_name

REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO / "deploy/configs/REFERENCE.md"


def test_every_config_field_has_a_description():
    missing = missing_descriptions()
    assert not missing, (
        "config fields without Field(description=...): " + ", ".join(missing) + " - describe what each does and "
        "when to change it, then regenerate deploy/configs/REFERENCE.md"
    )


def test_checked_in_reference_is_current():
    assert REFERENCE.exists(), "run: .venv/bin/python -m services.config_reference > deploy/configs/REFERENCE.md"
    assert REFERENCE.read_text() == render(), (
        "deploy/configs/REFERENCE.md is stale: regenerate it with "
        ".venv/bin/python -m services.config_reference > deploy/configs/REFERENCE.md"
    )


class _Inner(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    rate: float = Field(0.5, gt=0.0, le=1.0, description="a rate")


class _Outer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["a", "b"] = Field("a", description="the mode")
    count: int = 3
    inner: _Inner = Field(default_factory=_Inner, description="a section")


def test_render_lists_types_defaults_bounds_and_flags_undescribed_fields():
    assert missing_descriptions(_Outer) == ["count"]
    text = render(_Outer)
    assert '| `mode` | one of: `a`, `b` | `"a"` |  | the mode |' in text
    assert "| `inner.rate` | float | `0.5` | > 0.0, <= 1.0 | a rate |" in text
    assert "## `inner`" in text
    assert type_name(int | None) == "int \\| null"
    assert bounds_text(_Inner.model_fields["rate"]) == "> 0.0, <= 1.0"
