"""Stand-in of openhands.agent_server.env_parser: a config model read from the environment.

The upstream rules that choosing a sandbox service takes: a model's field ``x`` under
key ``K`` is the variable ``K_X``; a field whose type is an abstract
DiscriminatedUnionMixin is chosen by ``K_KIND``, a class name among its loaded
concrete subclasses, or a dotted path ``module.Class``, which is imported first;
scalars are the variable's text, left to pydantic to validate.
"""

from __future__ import annotations

import importlib
import os
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel

from openhands.sdk.utils.models import DiscriminatedUnionMixin, _is_abstract

M = TypeVar("M", bound=BaseModel)

_MISSING: Any = object()


def from_env(target_type: type[M], prefix: str = "") -> M:
    fields = _model(target_type, prefix)
    return target_type.model_validate({} if fields is _MISSING else fields)


def _model(model: type[BaseModel], key: str) -> Any:
    found = {}
    for name, field in model.model_fields.items():
        value = _value(field.annotation, f"{key}_{name.upper()}")
        if value is not _MISSING:
            found[name] = value
    return found or _MISSING


def _value(annotation: Any, key: str) -> Any:
    if isinstance(annotation, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    if (
        isinstance(annotation, type)
        and issubclass(annotation, DiscriminatedUnionMixin)
        and _is_abstract(annotation)
    ):
        kind = os.environ.get(f"{key}_KIND")
        if kind is None:
            return _MISSING
        if "." in kind:
            module, _, kind = kind.rpartition(".")
            importlib.import_module(module)
        chosen = annotation.resolve_kind(kind)  # an unknown kind fails here, early
        fields = _model(chosen, key)
        return {"kind": kind, **({} if fields is _MISSING else fields)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model(annotation, key)
    return os.environ.get(key, _MISSING)
