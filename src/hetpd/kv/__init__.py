"""Boundary decision 2, representation: what KV bytes mean and whether the other side can use them.

The pure-Python names are importable from here without torch (the planner uses them); the
torch parts live in ``codec``, ``layout`` and ``convert``.
"""

from hetpd.kv.bounds import ErrorBound
from hetpd.kv.check import FieldDifference, Verdict, VerdictKind, check
from hetpd.kv.encodings import ENCODINGS, format_for
from hetpd.kv.format import IncompatibleKVError, KVFormat, ModelFingerprint, Quantization
from hetpd.kv.plan import HandoffPlan, plan_handoff
from hetpd.kv.state import Residency, RuntimeKVState

__all__ = [
    "ENCODINGS", "ErrorBound", "FieldDifference", "HandoffPlan", "IncompatibleKVError", "KVFormat", "ModelFingerprint",
    "Quantization", "Residency", "RuntimeKVState", "Verdict", "VerdictKind", "check", "format_for", "plan_handoff",
]
