"""One way to say what is wrong with a config: each bad field's dotted path and the reason."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

_M = TypeVar("_M", bound=BaseModel)


def field_problems(exc: ValidationError) -> str:
    """``ValidationError`` -> one indented line per problem: ``  pools.0.kv_cache_dtype: <why>``."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())


def validated(model: type[_M], raw: object, error: type[ValueError], what: str, where: str) -> _M:
    """``model`` built from ``raw``, or ``error`` saying ``<where> is not a valid <what>:`` and each
    bad field (state untouched: nothing is built)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{where} is not a valid {what}:\n" + field_problems(exc)) from None
