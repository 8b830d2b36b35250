"""Stand-in of openhands.sdk.utils.models: a pydantic base whose abstract subclasses
validate as a union of their concrete subclasses, chosen by class name in ``kind``.

Upstream's mixin also serializes ``kind`` and builds JSON schemas; here only what
choosing an injector by ``OH_SANDBOX_KIND`` takes: validation by kind.
"""

from __future__ import annotations

import inspect
from abc import ABC
from typing import Any, Self

from pydantic import BaseModel, ModelWrapValidatorHandler, model_validator


def _is_abstract(cls: type) -> bool:
    return inspect.isabstract(cls) or ABC in cls.__bases__


def _concrete_subclasses(cls: type) -> dict[str, type]:
    found: dict[str, type] = {}
    sub: type
    for sub in cls.__subclasses__():
        found.update(_concrete_subclasses(sub))
        if not _is_abstract(sub):
            found[sub.__name__] = sub
    return found


class OpenHandsModel(BaseModel):
    """Upstream's (deprecated) base of models."""


class DiscriminatedUnionMixin(OpenHandsModel):
    @model_validator(mode="wrap")
    @classmethod
    def _validate_subtype(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        kind = data.pop("kind", None)
        if not _is_abstract(cls):
            assert kind in (None, cls.__name__), f"kind {kind} for {cls.__name__}"
            return handler(data)
        subclass = cls.resolve_kind(str(kind))
        result: Self = subclass.model_validate(data)
        return result

    @classmethod
    def resolve_kind(cls, kind: str) -> type[Self]:
        subclasses = _concrete_subclasses(cls)
        if kind not in subclasses:
            raise ValueError(
                f"Unknown kind '{kind}' for {cls.__module__}.{cls.__name__};"
                f" Expected one of: {list(subclasses)}"
            )
        subclass: type[Self] = subclasses[kind]
        return subclass
