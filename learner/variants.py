"""Registries of objective variants: a kind name -> (its own small pydantic config, its function).

Contract:
- A variant is one function plus one frozen pydantic config whose `kind: Literal["name"]` field names it;
  `Registry.register(Config, requires=..., tags=...)` decorates the function. Registering is all it takes:
  validation, the `requires` of the objective and the configuration reference follow from the registry.
- A config field typed `Annotated[BaseModel, registry]` accepts a bare kind (`"grpo"`: that variant with its
  defaults), a mapping with `kind` (`{kind: grpo, scale_by_std: false}`) or a registered config instance, and
  validates it as that variant's config: a tagged union on `kind` that stays open to variants registered
  later (a test's toy estimator, a user's module), which a union frozen at class creation could not.
- Errors name what was wrong and what to write: an unknown kind lists the registered ones; a field error
  keeps the field's own location (pydantic nests it under the union field).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from pydantic_core import core_schema

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Variant(Generic[F]):
    """One registered variant: its config class, its function and what it declares about itself."""

    kind: str
    config: type[BaseModel]
    fn: F
    requires: frozenset[str]  # optional objective inputs it reads (e.g. "values", "proximal_logprobs")
    tags: frozenset[str]  # properties other code asks about (e.g. "critic"), documented by each registry
    check: Callable[[Any, Any], list[str]] | None  # (its config, the whole section) -> cross-field problems
    min_group_size: Callable[[Any], int] | None  # samples per group it needs (checked against rollout.group_size)

    def problems(self, cfg: BaseModel, section: BaseModel) -> list[str]:
        return [] if self.check is None else self.check(cfg, section)

    def group_size_needed(self, cfg: BaseModel) -> int:
        return 1 if self.min_group_size is None else self.min_group_size(cfg)


class Registry(Generic[F]):
    """Kind -> `Variant`; also the pydantic annotation that validates a config field into a variant's config."""

    def __init__(self, what: str, field: str, tags: Iterable[str] = ()) -> None:
        self.what, self.field = what, field  # "advantage estimator", "objective.advantage"
        self.known_tags = frozenset(tags)
        self._variants: dict[str, Variant[F]] = {}

    def register(
        self,
        config: type[BaseModel],
        *,
        requires: Iterable[str] = (),
        tags: Iterable[str] = (),
        check: Callable[[Any, Any], list[str]] | None = None,
        min_group_size: Callable[[Any], int] | None = None,
    ):
        """Decorator: register `fn` as the variant named by `config`'s `kind` default.

        `check(cfg, section)` returns start-up problems that involve other fields of the section (e.g. the
        loss aggregation a variant needs); `min_group_size(cfg)` the group size it needs.
        """
        kind = _kind_of(config)
        unknown = set(tags) - self.known_tags
        if unknown:
            raise ValueError(f"{self.what} {kind!r}: unknown tags {sorted(unknown)}; known: {sorted(self.known_tags)}")

        def deco(fn: F) -> F:
            if kind in self._variants and self._variants[kind].config is not config:
                raise ValueError(f"{self.what} {kind!r} is already registered by {self._variants[kind].config}")
            self._variants[kind] = Variant(
                kind, config, fn, frozenset(requires), frozenset(tags), check, min_group_size
            )
            return fn

        return deco

    def unregister(self, kind: str) -> None:
        """Drop a variant (tests that register a toy one clean up with this)."""
        self._variants.pop(kind, None)

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._variants)

    def configs(self) -> list[type[BaseModel]]:
        return [v.config for v in self._variants.values()]

    def of(self, cfg: BaseModel) -> Variant[F]:
        """The variant that `cfg` (a registered config instance) configures."""
        return self.get(getattr(cfg, "kind", None))

    def get(self, kind: Any) -> Variant[F]:
        if kind not in self._variants:
            raise ValueError(f"unknown {self.what} {kind!r} in {self.field}; registered: {', '.join(self.kinds())}")
        return self._variants[kind]

    def with_tag(self, tag: str) -> tuple[str, ...]:
        return tuple(k for k, v in self._variants.items() if tag in v.tags)

    def parse(self, value: Any) -> BaseModel:
        """A bare kind, a mapping with `kind`, or a config instance -> the validated config of that variant."""
        if isinstance(value, BaseModel):
            if any(type(value) is v.config for v in self._variants.values()):
                return value
            value = value.model_dump()
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, dict) or "kind" not in value:
            raise ValueError(
                f"{self.field} must be a kind name or a mapping with `kind` (one of: {', '.join(self.kinds())}), "
                f"e.g. {self.field.rsplit('.', 1)[-1]}: {{kind: {self.kinds()[0]}}}"
            )
        return self.get(value["kind"]).config.model_validate(value)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v, info: v.model_dump(mode=info.mode), info_arg=True
            ),
        )


def _kind_of(config: type[BaseModel]) -> str:
    field = config.model_fields.get("kind")
    if field is None or not isinstance(field.default, str):
        raise ValueError(f"{config.__name__} needs a `kind: Literal['name'] = 'name'` field to be registered")
    return field.default
