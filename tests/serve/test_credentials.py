"""Secrets and keys come from the deployment file, a private file, or the environment."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hetpd.serve.credentials import CredentialError, read_secret_file, resolve, write_secret_file


def test_resolution_order_and_private_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "secret"
    file.write_text("from-file\nignored second line\n")
    file.chmod(0o600)
    monkeypatch.setenv("HETPD_TEST_SECRET", "from-env")
    assert resolve("inline", str(file), "HETPD_TEST_SECRET", "secret") == "inline"
    assert resolve(None, str(file), "HETPD_TEST_SECRET", "secret") == "from-file"
    assert resolve(None, None, "HETPD_TEST_SECRET", "secret") == "from-env"
    monkeypatch.delenv("HETPD_TEST_SECRET")
    assert resolve(None, None, "HETPD_TEST_SECRET", "secret") is None


def test_unusable_files_are_refused_by_name(tmp_path: Path) -> None:
    open_to_all = tmp_path / "shared"
    open_to_all.write_text("s3cret")
    open_to_all.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by other users.*chmod 600"):
        read_secret_file(open_to_all, "router.secret")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(CredentialError, match="empty"):
        read_secret_file(empty, "router.secret")
    with pytest.raises(CredentialError, match="missing"):
        read_secret_file(tmp_path / "missing", "router.secret")


def test_a_generated_secret_goes_to_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    path = write_secret_file("abc123", "secret-test")
    assert path.parent.parent == tmp_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_secret_file(path, "secret") == "abc123"
    assert path.parent.stat().st_uid == os.getuid()
