"""Stream raw documents from JSONL, Parquet and plain-text files, one record at a time.

A reader never stops on a bad record: it yields a `Record` with `text=None` and the
reason (malformed JSON, invalid UTF-8, missing or non-string text field, empty text, too
long), so the caller counts it. Only a missing file or an unknown format stops, before any
work starts (`check_inputs`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Optional

_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
FORMATS = ("auto", "jsonl", "parquet", "text")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".md": "text", ".py": "text"}


@dataclasses.dataclass
class Record:
    """One document: its text (None if unusable), the other fields, and where it came from."""

    text: Optional[str]
    fields: dict[str, Any]
    where: str  # "path:line" or "path:row"
    error: str = ""  # why text is None


def expand(patterns) -> list[Path]:
    """Files named by paths or globs, sorted within each pattern; a pattern matching nothing raises.

    `stdlib:GLOB` globs the running Python's standard library (third-party packages excluded):
    the embedded corpus, e.g. `stdlib:**/*.py`.
    """
    files = []
    for pattern in patterns:
        pattern = str(pattern)
        if pattern.startswith("stdlib:"):
            root = sysconfig.get_paths()["stdlib"]
            matches = sorted(m for m in glob.glob(os.path.join(root, pattern[len("stdlib:"):]), recursive=True)
                             if not _EXCLUDED.intersection(Path(m).relative_to(root).parts))
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input {str(pattern)!r} matches no file")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    return files


def format_of(path: Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".gz",)]
    found = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if found is None:
        raise ValueError(f"cannot tell the format of {str(path)!r} from its suffix; set the source's "
                         f"format to one of: {', '.join(FORMATS[1:])}")
    return found


def check_inputs(patterns, fmt: str = "auto") -> list[tuple[Path, str]]:
    """(file, format) for every input, or one clear error before any work starts."""
    files = expand(patterns)
    out = [(f, format_of(f, fmt)) for f in files]
    if any(f == "parquet" for _, f in out):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("reading Parquet needs pyarrow: pip install 'jaxlm[parquet]'") from None
    return out


def _check_text(text: Any, fields: dict, where: str, max_chars: int) -> Record:
    if text is None:
        return Record(None, fields, where, "missing_text")
    if not isinstance(text, str):
        return Record(None, fields, where, "text_not_a_string")
    if not text.strip():
        return Record(None, fields, where, "empty")
    if max_chars and len(text) > max_chars:
        return Record(None, fields, where, "too_long")
    return Record(text, fields, where)


def _has_lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a string with an unpaired surrogate (valid JSON, such as
    "\\ud800", but no Unicode text: it cannot be encoded, so no tokenizer can take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def jsonl_values(path: Path) -> Iterator[tuple[str, Any, str]]:
    """(where, value, error) for each non-blank line of a JSONL file: the parsed JSON value, or
    None and the reason it is unusable ("invalid_utf8", "malformed_json", "lone_surrogate"). A
    byte-order mark is dropped. The one JSONL reader: documents, SFT records, prompts and
    question/answer files all go through it."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                yield where, None, "invalid_utf8"
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                yield where, None, "malformed_json"
                continue
            if "\\u" in line and _has_lone_surrogate(value):  # only an escape can write one
                yield where, None, "lone_surrogate"
                continue
            yield where, value, ""


def read_jsonl(path: Path, text_field: str = "text", max_chars: int = 0) -> Iterator[Record]:
    for where, obj, error in jsonl_values(path):
        if error:
            yield Record(None, {}, where, error)
        elif not isinstance(obj, dict):
            yield Record(None, {}, where, "not_an_object")
        else:
            text = obj.pop(text_field, None)
            yield _check_text(text, obj, where, max_chars)


class Unreadable(str):
    """A JSONL line that holds no value, as its reason: "malformed_json", "invalid_utf8" or
    "lone_surrogate" (a str, so a caller counts it under that name; a line holding a JSON string
    is a record, not one of these)."""


def read_records(paths) -> Iterator[Any]:
    """The values of JSONL files (globs allowed), in order; an unreadable line yields an
    `Unreadable` (its reason) instead. A pattern matching no file raises."""
    for path in expand(paths):
        for _, obj, error in jsonl_values(path):
            yield Unreadable(error) if error else obj


def read_valid_records(path, valid, expected: str) -> list[dict]:
    """The records of a JSONL file of inputs that must all be usable (prompts, question/answer
    pairs): `valid(record)` says whether one is. A missing file, a line that is not JSON or a
    record that is not `valid` stops with one line naming the file and line (`expected` says
    what a record must hold), before any work starts."""
    from jaxlm.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"file {str(path)!r} does not exist")
    records = []
    for where, obj, error in jsonl_values(Path(path)):
        if error:
            raise ConfigError({"malformed_json": f"{where} is not valid JSON",
                               "invalid_utf8": f"{where} is not UTF-8 text",
                               "lone_surrogate": f"{where} holds an unpaired surrogate (an escape such as "
                                                 "\\ud800), which is not text"}[error])
        if not (isinstance(obj, dict) and valid(obj)):
            raise ConfigError(f"{where} needs {expected}")
        records.append(obj)
    return records


def read_parquet(path: Path, text_field: str = "text", max_chars: int = 0,
                 batch_rows: int = 1024) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for obj in batch.to_pylist():
            row += 1
            text = obj.pop(text_field, None)
            yield _check_text(text, obj, f"{path}:{row}", max_chars)


def read_text(path: Path, max_chars: int = 0) -> Iterator[Record]:
    """A plain-text file is one document."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        yield Record(None, {}, str(path), "invalid_utf8")
        return
    yield _check_text(text, {"path": str(path)}, str(path), max_chars)


def texts(inputs, text_field: str = "text", max_documents: int = 0):
    """(texts, counts): a generator of the usable records' texts of `inputs` in order (at most
    `max_documents`; 0: all), and `counts()` -> (texts yielded, unusable records skipped so far)."""
    files = check_inputs(inputs)
    skipped, n = 0, 0

    def gen():
        nonlocal skipped, n
        for path, fmt in files:
            for rec in read_documents(path, fmt, text_field):
                if rec.text is None:
                    skipped += 1
                    continue
                if max_documents and n >= max_documents:
                    return
                n += 1
                yield rec.text

    return gen(), lambda: (n, skipped)


def read_documents(path: Path, fmt: str, text_field: str = "text", max_chars: int = 0) -> Iterator[Record]:
    """Records of one file in its format (see `check_inputs`)."""
    if fmt == "jsonl":
        return read_jsonl(path, text_field, max_chars)
    if fmt == "parquet":
        return read_parquet(path, text_field, max_chars)
    return read_text(path, max_chars)
