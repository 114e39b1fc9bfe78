"""hetpd: heterogeneous prefill/decode LLM serving and planning.

``LLM`` and friends load lazily so that ``hetpd.core`` (scheduler, allocator) and the
other pure-Python layers can be imported without torch, as the planner's simulator does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetpd.llm import LLM
    from hetpd.outputs import CompletionOutput, RequestOutput
    from hetpd.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_LAZY = {
    "LLM": "hetpd.llm",
    "SamplingParams": "hetpd.sampling_params",
    "RequestOutput": "hetpd.outputs",
    "CompletionOutput": "hetpd.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hetpd' has no attribute {name!r}")
