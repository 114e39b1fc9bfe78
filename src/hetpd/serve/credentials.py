"""Where the deployment's shared secret and API key come from, and where a generated secret goes.

A secret on a command line is visible to every user of the host (``ps``), so none is ever
required there: each comes from the deployment file, a file it names, or the environment.
A secret ``hetpd serve`` generates is written to a file only its user can read, whose path it
prints, so a worker started by hand can join (``hetpd worker --secret-file PATH``).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

SECRET_ENV = "HETPD_SECRET"
API_KEY_ENV = "HETPD_API_KEY"


class CredentialError(ValueError):
    """A secret or key file that cannot be used; the message names it and why."""


def read_secret_file(path: str | Path, what: str) -> str:
    """The first line of ``path``, stripped; refused when empty or readable by other users."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
        text = file.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"{what} file {file}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise CredentialError(f"{what} file {file} is readable by other users (mode {mode & 0o777:o}); "
                              f"chmod 600 {file}")
    if not text:
        raise CredentialError(f"{what} file {file} is empty")
    return text.splitlines()[0]


def resolve(value: str | None, file: str | None, env: str, what: str) -> str | None:
    """The deployment file's value, else its file, else the environment variable, else None."""
    if value:
        return value
    if file:
        return read_secret_file(file, what)
    return os.environ.get(env) or None


def new_secret() -> str:
    return secrets.token_hex(16)


def write_secret_file(secret: str, name: str) -> Path:
    """Write ``secret`` to a fresh 0600 file in a 0700 per-user folder under the temp dir."""
    folder = Path(tempfile.gettempdir()) / f"hetpd-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise CredentialError(f"{folder} is not a private folder of this user; remove it or set $TMPDIR")
    path = folder / name
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secret + "\n")
    return path
