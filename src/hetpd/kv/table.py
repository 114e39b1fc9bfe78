"""The verdict table of ``docs/kv-boundary.md``, generated from ``check`` and ``plan_handoff``. Pure Python.

``python -m hetpd.kv.table`` prints it, ``--update docs/kv-boundary.md`` rewrites the document's\ngenerated section; a test keeps the two in step.
"""

from __future__ import annotations

from hetpd.kv.bounds import encoding_bound
from hetpd.kv.check import VerdictKind
from hetpd.kv.encodings import ENCODINGS, format_for
from hetpd.kv.format import ModelFingerprint
from hetpd.kv.plan import plan_handoff

# SmolLM2-135M's KV shape (30 layers, 3 kv heads of 64), the model hetpd serves by default.
REFERENCE_MODEL = ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "default theta=100000", "reference", "reference")
_SHORT = {VerdictKind.IDENTICAL: "=", VerdictKind.LOSSLESS_RELAYOUT: "R", VerdictKind.LOSSLESS_WIDENING: "W",
          VerdictKind.LOSSY: "L", VerdictKind.INCOMPATIBLE: "X"}
_SITE = {"none": "-", "producer": "P", "consumer": "C", "both": "PC"}


def encoding_matrix() -> str:
    """Producer encodings (rows) x consumer encodings (columns): verdict, conversion site, wire KiB/token."""
    names = list(ENCODINGS)
    lines = ["| producer \\ consumer | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for p in names:
        cells = []
        for c in names:
            plan = plan_handoff(format_for(REFERENCE_MODEL, p), format_for(REFERENCE_MODEL, c))
            kib = plan.wire.bytes_per_token() / 1024
            cells.append(f"{_SHORT[plan.verdict.kind]} {_SITE[plan.site]} {kib:.1f}")
        lines.append(f"| `{p}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def encoding_bounds() -> str:
    lines = ["| encoding | dtype | scales | bytes/token (all layers) | round-trip error bound |", "|---|---|---|---|---|"]
    for name, (dtype, q) in ENCODINGS.items():
        fmt = format_for(REFERENCE_MODEL, name)
        scales = "none" if q.scheme == "none" else (
            f"{q.scheme}{f' /{q.group_size}' if q.group_size else ''}{' + zero point' if q.zero_point else ''}, "
            f"{q.scale_dtype}")
        bound = encoding_bound(dtype, q.scheme, q.scale_dtype, q.zero_point).describe()
        lines.append(f"| `{name}` | {dtype} | {scales} | {fmt.bytes_per_token():.0f} | {bound} |")
    return "\n".join(lines)


def relayout_rows() -> str:
    base = format_for(REFERENCE_MODEL, "int8-token-f32")
    cases = [
        ("page_size 16 -> 32", base.with_(page_size=32)),
        ("layout NHD -> HND", base.with_(layout="HND")),
        ("K/V split -> joint", base.with_(kv_split=False)),
        ("scales separate -> inline", base.with_(scale_location="inline")),
        ("heads [0, 3) -> [1, 3) (TP split)", base.with_(head_start=1)),
    ]
    lines = ["| producer -> consumer (int8-token-f32 both) | verdict | steps | site | wire bytes/token |", "|---|---|---|---|---|"]
    for label, consumer in cases:
        plan = plan_handoff(base, consumer)
        lines.append(f"| {label} | {plan.verdict.kind.value} | {', '.join(plan.verdict.steps)} | {plan.site} | "
                     f"{plan.wire.bytes_per_token():.0f} |")
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join([
        "#### Encodings and their error bounds\n\n" + encoding_bounds(),
        "#### Every pair of encodings\n\nCell: verdict (`=` identical, `R` lossless relayout, `W` lossless widening, "
        "`L` lossy, `X` incompatible), conversion site (`P` producer, `C` consumer, `-` none), KiB per token on the "
        "wire. Consumer and producer share page size and layout here; see the next table for those.\n\n"
        + encoding_matrix(),
        "#### Layout differences (values untouched)\n\n" + relayout_rows(),
    ])


START, END = "<!-- verdict-table:start -->\n", "\n<!-- verdict-table:end -->"


def update(path: str) -> None:
    """Rewrite the generated section of a document in place."""
    with open(path) as f:
        doc = f.read()
    head, tail = doc[: doc.index(START) + len(START)], doc[doc.index(END):]
    with open(path, "w") as f:
        f.write(head + render() + tail)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        update(sys.argv[2])
    else:
        print(render())
