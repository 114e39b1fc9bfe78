"""One way to say what is wrong with a config: each bad field's dotted path and the reason."""

from __future__ import annotations

from pydantic import ValidationError


def field_problems(exc: ValidationError) -> str:
    """``ValidationError`` -> one indented line per problem: ``  pools.0.kv_cache_dtype: <why>``."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
