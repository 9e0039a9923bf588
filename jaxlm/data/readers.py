"""Stream raw documents from JSONL, JSON, Parquet and plain-text files, one record at a time.

A file may be compressed (gzip, zstd, bzip2, xz: told by its leading bytes, whatever its name).
A reader never stops on a bad record: it yields a `Record` with `text=None` and the reason
(malformed JSON, invalid UTF-8, missing or non-string text field, empty text, too long, a
damaged compressed stream), so the caller counts it. Only a missing file or an unknown format
stops, before any work starts (`check_inputs`).
"""
from __future__ import annotations

import bz2
import collections
import dataclasses
import glob
import gzip
import io
import json
import lzma
import os
import re
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from jaxlm.config.data import SPLITS

_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
FORMATS = ("auto", "jsonl", "parquet", "text")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bzip2", ".xz": "xz"}
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".md": "text", ".py": "text"}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_BAD_STREAM = (EOFError, OSError, zlib.error, lzma.LZMAError)  # a truncated or damaged compressed file


def _bad_stream() -> tuple:
    zstandard = sys.modules.get("zstandard")
    return _BAD_STREAM + ((zstandard.ZstdError,) if zstandard else ())


@dataclasses.dataclass
class Record:
    """One document: its text (None if unusable), the other fields, and where it came from."""

    text: Optional[str]
    fields: dict[str, Any]
    where: str  # "path:line", "path[element]" (a JSON array), "path:row" (Parquet); "#k": piece k
    error: str = ""  # why text is None


def expand(patterns) -> list[Path]:
    """Files named by paths, directories (every file below, hidden ones excluded) or globs, sorted
    within each pattern; a pattern matching no file raises.

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
        elif os.path.isdir(pattern):
            matches = sorted(str(p) for p in Path(pattern).rglob("*")
                             if not any(part.startswith(".") for part in p.relative_to(pattern).parts))
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            what = "is a directory with no file" if os.path.isdir(pattern) else "matches no file"
            raise FileNotFoundError(f"input {pattern!r} {what}")
        files.extend(found)
    return files


def counts_line(counts, truncated: bool = False) -> str:
    """A reader's counts in words: "U of R records used[, T truncated]; unusable: {reason: n}"."""
    bad = {k: v for k, v in counts.items() if k not in ("records", "used", "truncated")}
    cut = f", {counts['truncated']} truncated" if truncated else ""
    return f"{counts['used']} of {counts['records']} records used{cut}; unusable: {dict(sorted(bad.items())) or 'none'}"


def expand_prepared(patterns, key: str) -> list[Path]:
    """`expand` for the inputs of `jaxlm data tokenizer` / `tokenize` (`key` names them): a
    missing file names the command that writes it."""
    try:
        return expand(patterns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}; `jaxlm data prepare CONFIG` writes the prepared documents "
                                "(prepare.out_dir/SOURCE.jsonl)") from None


def format_of(path: Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    found = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if found is None:
        raise ValueError(f"cannot tell the format of {str(path)!r} from its suffix; set the source's "
                         f"format to one of: {', '.join(FORMATS[1:])}")
    return found


def compression_of(path: Path) -> Optional[str]:
    """"gzip", "zstd", "bzip2", "xz" (by the file's leading bytes), or None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"reading zstd-compressed {str(path)!r} needs zstandard: "
                         "pip install 'jaxlm[data]'") from None
    return zstandard


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzip, zstd, bzip2 or xz (see `compression_of`)."""
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bzip2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        reader = _zstandard(path).ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                   closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def file_stamps(paths) -> list[list]:
    """[path, size, mtime_ns] of each file: what says a rerun reads the same inputs."""
    return [[str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def check_inputs(patterns, fmt: str = "auto") -> list[tuple[Path, str]]:
    """(file, format) for every input, or one clear error before any work starts."""
    files = expand(patterns)
    out = [(f, format_of(f, fmt)) for f in files]
    if any(f == "parquet" for _, f in out):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("reading Parquet needs pyarrow: pip install 'jaxlm[parquet]'") from None
    for f in (f for f, fm in out if fm != "parquet" and compression_of(f) == "zstd"):
        _zstandard(f)  # the clear error now, if zstandard is missing
        break
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


def _line_value(where: str, raw: bytes):
    """(where, value, error) of one JSONL line, or None for a blank line."""
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return where, None, "invalid_utf8"
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return where, None, "malformed_json"
    if "\\u" in line and _has_lone_surrogate(value):  # only an escape can write one
        return where, None, "lone_surrogate"
    return where, value, ""


def _array_values(path: Path, data: bytes):
    """(where, value, error) of each element, if `data` is one JSON array; else None."""
    try:
        text = data.decode("utf-8-sig")
        array = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(array, list):
        return None
    surrogates = "\\u" in text
    return [(f"{path}[{i}]", *((None, "lone_surrogate") if surrogates and _has_lone_surrogate(v) else (v, "")))
            for i, v in enumerate(array)]


def jsonl_values(path: Path) -> Iterator[tuple[str, Any, str]]:
    """(where, value, error) for each non-blank line of a JSONL file: the parsed JSON value, or
    None and the reason it is unusable ("invalid_utf8", "malformed_json", "lone_surrogate",
    "damaged_file": a compressed stream that is cut short or corrupt ends the file there). A
    byte-order mark is dropped. A file holding one JSON array (its first character, after a
    byte-order mark and whitespace, is "[" and the whole file parses) yields its elements as
    `path[i]` instead; such a file is read whole into memory. The one JSONL reader: documents,
    SFT records, prompts and question/answer files all go through it."""
    try:
        with open_binary(path) as f:
            lines = f
            if f.peek(4096)[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                data = f.read()
                values = _array_values(path, data)
                if values is not None:
                    yield from values
                    return
                lines = io.BytesIO(data)
            for i, raw in enumerate(lines, 1):
                item = _line_value(f"{path}:{i}", raw)
                if item is not None:
                    yield item
    except _bad_stream():
        yield str(path), None, "damaged_file"


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
    """A JSONL line that holds no value, as its reason: "malformed_json", "invalid_utf8",
    "lone_surrogate" or "damaged_file" (a str, so a caller counts it under that name; a line
    holding a JSON string is a record, not one of these)."""


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
                                                 "\\ud800), which is not text",
                               "damaged_file": f"{where} is a damaged or truncated compressed file"}[error])
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
    """A plain-text file is one text (`read_documents` may split it into documents)."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except _bad_stream():
        yield Record(None, {}, str(path), "damaged_file")
        return
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        yield Record(None, {}, str(path), "invalid_utf8")
        return
    yield _check_text(text, {"path": str(path)}, str(path), max_chars)


PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")  # a blank line (spaces allowed)


def paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` (split at blank lines), stripped, empty ones left out."""
    return [p for p in (p.strip() for p in PARAGRAPH_BREAK.split(text)) if p]


def _cut(window: str) -> int:
    """Where to end a chunk that may be at most `len(window)` long: after the last paragraph
    break, else line break, in the window's second half; else after its last whitespace; else at
    its end (a run of non-space characters longer than a chunk)."""
    for sep in ("\n\n", "\n"):
        i = window.rfind(sep)
        if i >= len(window) // 2:
            return i + len(sep)
    spaces = [m.end() for m in re.finditer(r"\s+", window)]
    return spaces[-1] if spaces and spaces[-1] < len(window) else len(window)


def split_text(text: str, how: str = "document", chunk_chars: int = 0) -> list[str]:
    """The documents one text becomes (`how` one of `SPLITS`): `document` the whole text;
    `paragraphs` each paragraph (blank-line separated), stripped; `chunks` consecutive pieces of
    at most `chunk_chars` characters, each ending at a paragraph or line break or whitespace when
    one lies in reach (see `_cut`), so the chunks joined give back the text exactly."""
    if how not in SPLITS:
        raise ValueError(f"split {how!r} is not a split; allowed: {', '.join(SPLITS)}")
    if how == "document":
        return [text]
    if how == "paragraphs":
        return paragraphs(text)
    if chunk_chars <= 0:
        raise ValueError(f"split chunks needs chunk_chars > 0; got {chunk_chars}")
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        end = start + _cut(text[start:start + chunk_chars])
        pieces.append(text[start:end])
        start = end
    return pieces + [text[start:]] if start < len(text) else pieces


def read_documents(path: Path, fmt: str, text_field: str = "text", max_chars: int = 0,
                   split: str = "document", chunk_chars: int = 0) -> Iterator[Record]:
    """Records of one file in its format (see `check_inputs`), each text split into documents by
    `split` (see `split_text`; piece k of a record is `where#k`) and then checked against
    `max_chars`."""
    if fmt == "jsonl":
        records = read_jsonl(path, text_field)
    elif fmt == "parquet":
        records = read_parquet(path, text_field)
    else:
        records = read_text(path)
    for rec in records:
        if rec.text is None:
            yield rec
        elif split == "document":
            yield _check_text(rec.text, rec.fields, rec.where, max_chars)
        else:
            for k, piece in enumerate(split_text(rec.text, split, chunk_chars)):
                yield _check_text(piece, dict(rec.fields), f"{rec.where}#{k}", max_chars)


def texts(inputs, text_field: str = "text", max_documents: int = 0):
    """(texts, counts): a generator of the usable records' texts of `inputs` in order (at most
    `max_documents`; 0: all), and `counts()` -> (texts yielded, Counter of the unusable records
    skipped so far by reason)."""
    files = check_inputs(inputs)
    skipped, n = collections.Counter(), 0

    def gen():
        nonlocal n
        for path, fmt in files:
            for rec in read_documents(path, fmt, text_field):
                if rec.text is None:
                    skipped[rec.error] += 1
                    continue
                if max_documents and n >= max_documents:
                    return
                n += 1
                yield rec.text

    return gen(), lambda: (n, skipped)


def describe_losses(reasons: dict) -> str:
    """"3 malformed_json, 1 empty": counts by reason, the most frequent first."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])) or "none"


def text_field_hint(key: str, text_field: str) -> str:
    """The hint when records lack the text field."""
    return f"is the text under another field than {key}={text_field!r}?"


def no_documents(section: str, text_field: str, skipped: dict) -> str:
    """The one line when `section.inputs` yielded no usable record."""
    hint = f"; {text_field_hint(f'{section}.text_field', text_field)}" if skipped.get("missing_text") else ""
    return (f"{section}.inputs yielded no usable record (skipped: {describe_losses(skipped)}){hint}")
