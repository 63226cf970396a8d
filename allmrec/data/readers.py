"""Line-oriented readers that turn the raw data formats into the declared Arrow schemas.

Every reader streams its file a line at a time (a full Amazon category is tens of GB
uncompressed), so memory is bounded by one batch, not by the file. A line that cannot be
parsed is never silently dropped: it comes back as a `BadLine` with its 1-based line number
and the reason, so `prepare` can count and report it. Only problems that make a whole file
unreadable (no header, empty, not gzip, not decodable) raise `DataFormatError`.

Paths are local or any fsspec URL (s3://, gs://, ...). They may name a member of a zip
archive as "archive.whl!inner/path" (fsspec's zip filesystem over the archive): MovieLens'
licence forbids redistributing it, so the project reads it straight out of RecBole's wheels.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import fsspec
import pyarrow as pa
from fsspec.utils import infer_compression

from allmrec.data.schema import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA

log = logging.getLogger(__name__)

FORMATS = ("grouplens-100k", "grouplens-1m", "recbole", "amazon-2018", "amazon-2023")

# Suffixes after which a "!" separates an archive from one of its members.
_ARCHIVE_SUFFIXES = (".zip", ".whl")
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_TEXT = 200
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# MovieLens 100K's u.item genre flags, in the order of its README.
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# RecBole .item fields that may carry the title, first present wins.
RECBOLE_TITLE_FIELDS = ("title", "movie_title", "item_title", "name")

# MovieLens files predate UTF-8 and are latin-1; latin-1 also never fails to decode.
_INTERACTION_ENCODING = {
    "grouplens-100k": "latin-1",
    "grouplens-1m": "latin-1",
    "recbole": "utf-8",
    "amazon-2018": "utf-8",
    "amazon-2023": "utf-8",
}
_ITEM_ENCODING = dict(_INTERACTION_ENCODING)

# The extra string columns each fixed-layout format appends to RAW_ITEMS_SCHEMA. They are the
# same for every file of a format (null where a line lacks the field), so tables read from
# several files of one format always concatenate.
_ITEM_EXTRAS = {
    "grouplens-100k": ("genres", "release_date"),
    "grouplens-1m": ("genres",),
    "amazon-2018": ("brand", "category"),
    "amazon-2023": ("main_category", "store", "features"),
}


class DataFormatError(ValueError):
    """A file (or one line of it) is not in the declared format.

    The message always names the file, and the line and field when known, with what was
    expected: it is what an operator reads when a `prepare` run stops.
    """

    def __init__(
        self,
        path: str,
        problem: str,
        line_no: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.problem = problem
        self.line_no = line_no
        self.field = field
        where = path if line_no is None else f"{path} line {line_no}"
        what = problem if field is None else f"field {field!r}: {problem}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships exceptions between processes by pickling; the default reduce would call
        # __init__ with the formatted message alone.
        return (type(self), (self.path, self.problem, self.line_no, self.field))


@dataclass(frozen=True)
class BadLine:
    """One malformed line, kept so that data loss is counted and shown, never silent."""

    path: str
    line_no: int  # 1-based
    reason: str  # e.g. "field 'rating': expected a number, got 'abc'"
    text: str  # the line, truncated to 200 characters

    def describe(self) -> str:
        name = os.path.basename(self.path) or self.path
        return f"{name} line {self.line_no}: {self.reason} (line: {self.text!r})"


class _Bad(Exception):
    """Raised by a line parser; turned into a BadLine by the loop that called it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known formats are: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# Opening files


def _split_archive(path: str) -> tuple[str, str] | None:
    """Return (archive, member) when `path` names a zip member, else None.

    A path that exists as a plain file is never split, so a "!" in a directory name works.
    """
    if "!" not in path or os.path.isfile(path):
        return None
    archive, member = path.split("!", 1)
    if not archive.lower().endswith(_ARCHIVE_SUFFIXES) and not os.path.isfile(archive):
        return None
    return archive, member.lstrip("/")


def readable_from_every_node(paths: list[str]) -> bool:
    """Every path (or the archive a member is read from) is a URL of a shared store (s3://,
    gs://, https://, ...), not a file on this machine's disk: any node can read them."""

    def shared(path: str) -> bool:
        split = _split_archive(path)
        location = split[0] if split else path
        protocol = fsspec.core.split_protocol(location)[0]
        return protocol not in (None, "file", "local")

    return bool(paths) and all(shared(p) for p in paths)


@contextmanager
def _filesystem(path: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fsspec filesystem, path in it, what to call it in errors) of a local or remote file
    (s3://, gs://, any fsspec URL) or of a member of a zip archive that is itself local or
    remote: fsspec's zip filesystem over the archive's URL."""
    split = _split_archive(path)
    if split is None:
        fs, inner = fsspec.core.url_to_fs(path)
        yield fs, inner, path
        return
    archive, member = split
    try:
        # A new instance, not fsspec's cached one: an archive rewritten in place must be read
        # again (the tests do; so does a user fixing a download).
        fs = fsspec.filesystem("zip", fo=archive, skip_instance_cache=True)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such archive", archive) from None
    except zipfile.BadZipFile as exc:
        raise DataFormatError(path, f"{archive} is not a valid zip archive ({exc})") from exc
    try:
        yield fs, member, f"member {member!r} of {archive}"
    finally:
        fs.close()


def _check_file(fs: fsspec.AbstractFileSystem, inner: str, path: str) -> None:
    """FileNotFoundError naming a missing file ("no member X in Y" for a zip member, with the
    members of the same name), IsADirectoryError for a directory."""
    if fs.isfile(inner):
        return
    if fs.isdir(inner):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    split = _split_archive(path)
    if split is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    archive, member = split
    base = member.rsplit("/", 1)[-1]
    near = [n for n in fs.find("") if n.rsplit("/", 1)[-1] == base][:5]
    hint = f"; members with that name: {', '.join(near)}" if near else ""
    raise FileNotFoundError(f"no member {member!r} in {archive}{hint}")


@contextmanager
def open_binary(path: str) -> Iterator[BinaryIO]:
    """Open a file (local or any fsspec URL), or a zip member ("archive.whl!inner/path"), for
    reading, decompressed when it is gzip.

    Gzip is recognised by the name (fsspec's inference) or by its magic bytes, so a dump that
    was compressed without the suffix reads too; one named ".gz" that is not gzip fails on the
    first read. A missing file raises FileNotFoundError naming it ("no member X in Y" for a
    zip member).
    """
    with ExitStack() as stack:
        fs, inner, _ = stack.enter_context(_filesystem(path))
        _check_file(fs, inner, path)
        # readline of a zip member is pure Python; a C BufferedReader over it is ~2x faster.
        raw: Any = stack.enter_context(io.BufferedReader(fs.open(inner, "rb"), 1 << 16))
        if infer_compression(inner) == "gzip" or raw.peek(2)[:2] == _GZIP_MAGIC:
            raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        yield raw


def source_sha256(path: str) -> str:
    """sha256 of a file's bytes as stored (a zip member's own, not its archive's; a gzip file's
    compressed bytes), local or remote."""
    with _filesystem(path) as (fs, inner, _), fs.open(inner, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def open_text(path: str, encoding: str = "utf-8") -> Iterator[TextIO]:
    """`open_binary` as text. Newlines are left untranslated ("\\r\\n" stays) and lines
    split on "\\n" only, so a stray "\\r" inside a field never starts a new line.

    The readers do not use this: they decode line by line, so that an undecodable byte is
    reported at its own line (a text stream decodes 8 KiB chunks ahead of the line read).
    """
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding=encoding, newline="\n") as text:
        yield text


def _check_encoding(encoding: str) -> None:
    """The readers split bytes on b"\\n", which is only right for ASCII-compatible codecs."""
    try:
        ok = "\n:\t|".encode(encoding) == b"\n:\t|"
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if not ok:
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible; expected e.g. utf-8")


def _numbered_lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its line ending) for the non-blank lines.

    Raises DataFormatError for an empty file and for errors that make the rest of the file
    unreadable (bad gzip data, text not in `encoding`), naming the line where they happened.
    """
    seen = 0
    line_no = 0
    with open_binary(path) as stream:
        # One try around the loop, not one per line: it is the hot path. Exceptions raised
        # by the consumer never enter here (a generator only sees them through throw()).
        try:
            for line_no, raw in enumerate(stream, 1):  # noqa: B007 - read in the handlers
                line = raw.decode(encoding).rstrip("\r\n")
                if line_no == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if not line.strip():
                    continue
                seen += 1
                yield line_no, line
        except UnicodeDecodeError as exc:
            raise DataFormatError(
                path,
                f"expected {encoding} text, got an undecodable byte at byte {exc.start + 1} "
                f"({exc.reason})",
                line_no,
            ) from exc
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DataFormatError(
                path,
                f"expected valid gzip data, it is corrupt or truncated ({exc})",
                line_no + 1,
            ) from exc
        except zipfile.BadZipFile as exc:
            raise DataFormatError(path, f"corrupt zip member ({exc})", line_no + 1) from exc
    if seen == 0:
        raise DataFormatError(path, "file is empty, expected at least one line of data")


# --------------------------------------------------------------------------------------------
# Field parsing shared by the formats


def _id(value: Any, field: str) -> str:
    if isinstance(value, str):
        value = value.strip()
        if value:
            return value
        raise _Bad(f"field {field!r}: expected a non-empty id, got an empty one")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise _Bad(f"field {field!r}: expected a non-empty id, got null")
    raise _Bad(f"field {field!r}: expected a string id, got {type(value).__name__}")


def _timestamp(value: Any, field: str, divisor: int = 1) -> int:
    """Whole seconds from an int or a numeric string ("881250949" or "881250949.0")."""
    if isinstance(value, bool):
        raise _Bad(f"field {field!r}: expected an integer timestamp, got {value!r}")
    if isinstance(value, int):
        ts = value
    else:
        if isinstance(value, str):
            try:
                ts = int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise _Bad(
                        f"field {field!r}: expected an integer timestamp, got {value[:40]!r}"
                    ) from None
                ts = _whole(as_float, field, value)
        elif isinstance(value, float):
            ts = _whole(value, field, value)
        elif value is None:
            raise _Bad(f"field {field!r}: expected an integer timestamp, got null")
        else:
            raise _Bad(
                f"field {field!r}: expected an integer timestamp, got {type(value).__name__}"
            )
    if divisor != 1:
        ts //= divisor
    if not _INT64_MIN <= ts <= _INT64_MAX:
        raise _Bad(f"field {field!r}: expected a timestamp in the int64 range, got {value!r}")
    return ts


def _whole(x: float, field: str, raw: Any) -> int:
    if not math.isfinite(x):
        raise _Bad(f"field {field!r}: expected an integer timestamp, got {raw!r}")
    return int(x)


def _rating(value: Any, field: str) -> float | None:
    """A finite rating, or None where the source has none (an optional field)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Bad(f"field {field!r}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        r = float(value)
    elif isinstance(value, str):
        try:
            r = float(value)
        except ValueError:
            raise _Bad(f"field {field!r}: expected a number, got {value[:40]!r}") from None
    else:
        raise _Bad(f"field {field!r}: expected a number, got {type(value).__name__}")
    if not math.isfinite(r) or abs(r) > 3.0e38:
        raise _Bad(f"field {field!r}: expected a finite number, got {value!r}")
    return r


def _str_id(value: str, field: str) -> str:
    """Fast path of `_id` for a field split out of a text line."""
    value = value.strip()
    if not value:
        raise _Bad(f"field {field!r}: expected a non-empty id, got an empty one")
    return value


def _str_timestamp(value: str, field: str) -> int:
    """Fast path of `_timestamp` for a field split out of a text line."""
    try:
        ts = int(value)
    except ValueError:
        return _timestamp(value, field)
    if not _INT64_MIN <= ts <= _INT64_MAX:
        raise _Bad(f"field {field!r}: expected a timestamp in the int64 range, got {value!r}")
    return ts


def _str_rating(value: str, field: str) -> float:
    """Fast path of `_rating` for a required field split out of a text line."""
    try:
        r = float(value)
    except ValueError:
        shown = repr(value[:40]) if value.strip() else "an empty value"
        raise _Bad(f"field {field!r}: expected a number, got {shown}") from None
    if not -3.0e38 <= r <= 3.0e38:  # also false for NaN and infinities
        raise _Bad(f"field {field!r}: expected a finite number, got {value!r}")
    return r


def _text(value: Any, sep: str = " ") -> str | None:
    """Free text from a JSON value: lists are joined with `sep`; empty means None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, list):
        parts = [p for p in (_text(v, sep) for v in value) if p]
        return sep.join(parts) or None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False) or None
    return str(value)


def _tsv_text(value: str) -> str | None:
    return value if value.strip() else None


def _fields(line: str, sep: str, expected: int, layout: str) -> list[str]:
    parts = line.split(sep)
    if len(parts) != expected:
        name = "tab" if sep == "\t" else repr(sep)
        raise _Bad(f"expected {expected} {name}-separated fields ({layout}), got {len(parts)}")
    return parts


def _json_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Bad(
            f"expected a JSON object, got invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def _required(obj: dict[str, Any], key: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise _Bad(f"field {key!r}: expected a key {key!r}, it is missing") from None


# --------------------------------------------------------------------------------------------
# Interaction line parsers: each returns (user_id, item_id, timestamp, rating) or raises _Bad.

_Interaction = tuple[str, str, int, float | None]
_InterParser = Callable[[str], _Interaction]


def _ml100k_interaction(line: str) -> _Interaction:
    u, i, r, t = _fields(line, "\t", 4, "user id, item id, rating, timestamp")
    return (
        _str_id(u, "user id"),
        _str_id(i, "item id"),
        _str_timestamp(t, "timestamp"),
        _str_rating(r, "rating"),
    )


def _ml1m_interaction(line: str) -> _Interaction:
    u, i, r, t = _fields(line, "::", 4, "UserID::MovieID::Rating::Timestamp")
    return (
        _str_id(u, "UserID"),
        _str_id(i, "MovieID"),
        _str_timestamp(t, "Timestamp"),
        _str_rating(r, "Rating"),
    )


def _amazon2018_interaction(line: str) -> _Interaction:
    obj = _json_object(line)
    return (
        _id(_required(obj, "reviewerID"), "reviewerID"),
        _id(_required(obj, "asin"), "asin"),
        _timestamp(_required(obj, "unixReviewTime"), "unixReviewTime"),
        _rating(obj.get("overall"), "overall"),
    )


def _amazon2023_interaction(line: str) -> _Interaction:
    obj = _json_object(line)
    return (
        _id(_required(obj, "user_id"), "user_id"),
        _id(_required(obj, "parent_asin"), "parent_asin"),
        # Amazon Reviews 2023 writes milliseconds; the schema holds seconds.
        _timestamp(_required(obj, "timestamp"), "timestamp", divisor=1000),
        _rating(obj.get("rating"), "rating"),
    )


def _recbole_header(path: str, lines: Iterator[tuple[int, str]]) -> tuple[int, list[str]]:
    """Read a RecBole header line into field names ("user_id:token" -> "user_id")."""
    line_no, line = next(lines)  # _numbered_lines raises on an empty file
    names = [f.split(":", 1)[0].strip() for f in line.split("\t")]
    if any(not n for n in names):
        raise DataFormatError(path, f"expected a header of name:type fields, got {line!r}", line_no)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataFormatError(
            path, f"expected distinct header fields, {', '.join(dupes)} repeated", line_no
        )
    return line_no, names


def _recbole_require(path: str, line_no: int, names: list[str], required: tuple[str, ...]) -> None:
    missing = [r for r in required if r not in names]
    if missing:
        raise DataFormatError(
            path,
            f"expected header fields {', '.join(required)}; missing {', '.join(missing)} "
            f"(found {', '.join(names)})",
            line_no,
            field=missing[0],
        )


def _recbole_interaction_parser(path: str, lines: Iterator[tuple[int, str]]) -> _InterParser:
    line_no, names = _recbole_header(path, lines)
    _recbole_require(path, line_no, names, ("user_id", "item_id", "timestamp"))
    n = len(names)
    ui, ii, ti = names.index("user_id"), names.index("item_id"), names.index("timestamp")
    ri = names.index("rating") if "rating" in names else None
    layout = ", ".join(names)

    def parse(line: str) -> _Interaction:
        f = line.split("\t")
        if len(f) != n:
            raise _Bad(f"expected {n} tab-separated fields ({layout}), got {len(f)}")
        # An empty rating cell is a missing rating (null), as an absent rating column is.
        rating = _str_rating(f[ri], "rating") if ri is not None and f[ri] else None
        return (
            _str_id(f[ui], "user_id"),
            _str_id(f[ii], "item_id"),
            _str_timestamp(f[ti], "timestamp"),
            rating,
        )

    return parse


def _interaction_parser(fmt: str, path: str, lines: Iterator[tuple[int, str]]) -> _InterParser:
    if fmt == "grouplens-100k":
        return _ml100k_interaction
    if fmt == "grouplens-1m":
        return _ml1m_interaction
    if fmt == "recbole":
        return _recbole_interaction_parser(path, lines)
    if fmt == "amazon-2018":
        return _amazon2018_interaction
    return _amazon2023_interaction


def _bad_line(path: str, line_no: int, reason: str, line: str) -> BadLine:
    return BadLine(path=path, line_no=line_no, reason=reason, text=line[:_MAX_TEXT])


def _log_bad(path: str, bad_count: int, first: BadLine | None, good: int) -> None:
    if bad_count and first is not None:
        log.warning(
            "%s: %d malformed line(s) skipped, %d read; first: %s",
            path,
            bad_count,
            good,
            first.describe(),
        )


def iter_interaction_batches(
    path: str,
    fmt: str,
    batch_rows: int = 65536,
    encoding: str | None = None,
) -> Iterator[tuple[pa.Table, list[BadLine]]]:
    """Stream an interaction file as tables of RAW_INTERACTIONS_SCHEMA.

    Each batch holds at most `batch_rows` rows, with the malformed lines met while reading
    them (a batch may hold no rows, only bad lines). `source_line` is the 1-based line number
    in the file, which `prepare` uses to break timestamp ties stably.

    The format, `batch_rows` and the file's existence are checked at the call, not at the
    first `next()`, so a typo fails where it was made. A file without a single parseable line
    (or a RecBole header with nothing after it) raises DataFormatError once read through:
    that is a wrong format or a truncated file, not dirty data.
    """
    _check_format(fmt)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    _check_exists(path)
    if encoding is not None:
        _check_encoding(encoding)
    return _interaction_batches(path, fmt, batch_rows, encoding or _INTERACTION_ENCODING[fmt])


def _interaction_batches(
    path: str, fmt: str, batch_rows: int, encoding: str
) -> Iterator[tuple[pa.Table, list[BadLine]]]:
    lines = _numbered_lines(path, encoding)
    parse = _interaction_parser(fmt, path, lines)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float | None] = []
    src: list[int] = []
    bad: list[BadLine] = []
    good_total = 0
    bad_total = 0
    first_bad: BadLine | None = None

    def flush() -> tuple[pa.Table, list[BadLine]]:
        table = pa.table(
            {
                "user_id": users,
                "item_id": items,
                "timestamp": times,
                "rating": ratings,
                "source_line": src,
            },
            schema=RAW_INTERACTIONS_SCHEMA,
        )
        return table, bad

    for line_no, line in lines:
        try:
            u, i, t, r = parse(line)
        except _Bad as exc:
            b = _bad_line(path, line_no, exc.reason, line)
            bad.append(b)
            bad_total += 1
            if first_bad is None:
                first_bad = b
            if len(bad) >= batch_rows:  # bound memory when a file is mostly garbage
                yield flush()
                users, items, times, ratings, src, bad = [], [], [], [], [], []
            continue
        users.append(u)
        items.append(i)
        times.append(t)
        ratings.append(r)
        src.append(line_no)
        good_total += 1
        if len(users) >= batch_rows:
            yield flush()
            users, items, times, ratings, src, bad = [], [], [], [], [], []
    if users or bad:
        yield flush()
    _log_bad(path, bad_total, first_bad, good_total)
    if good_total == 0:
        raise _no_valid_line(path, fmt, "interaction", bad_total, first_bad)


def _no_valid_line(
    path: str, fmt: str, kind: str, bad_count: int, first: BadLine | None
) -> DataFormatError:
    """A file without one usable line is a wrong format or a truncated file, not dirty data."""
    if first is None:
        return DataFormatError(path, f"expected {kind} lines after the header, found none")
    return DataFormatError(
        path,
        f"expected {fmt} {kind} lines, but all {bad_count} are malformed (is the format "
        f"right?); first: {first.describe()}",
    )


def _check_exists(path: str) -> None:
    """Fail at the call for a missing file or zip member, not at the first read."""
    with _filesystem(path) as (fs, inner, _):
        _check_file(fs, inner, path)


# --------------------------------------------------------------------------------------------
# Item line parsers: each returns (item_id, title, description, extras) or raises _Bad.

_Item = tuple[str, str | None, str | None, tuple[str | None, ...]]
_ItemParser = Callable[[str], _Item]


def _ml100k_item(line: str) -> _Item:
    f = _fields(line, "|", 5 + len(ML100K_GENRES), "movie id | title | dates | URL | 19 genres")
    genres = []
    for name, flag in zip(ML100K_GENRES, f[5:], strict=True):
        if flag == "1":
            genres.append(name)
        elif flag != "0":
            raise _Bad(f"field 'genre {name}': expected 0 or 1, got {flag[:40]!r}")
    return (
        _id(f[0], "movie id"),
        _tsv_text(f[1]),
        None,
        (", ".join(genres) or None, _tsv_text(f[2])),
    )


def _ml1m_item(line: str) -> _Item:
    i, title, genres = _fields(line, "::", 3, "MovieID::Title::Genres")
    names = [g for g in genres.split("|") if g.strip()]
    return _id(i, "MovieID"), _tsv_text(title), None, (", ".join(names) or None,)


def _amazon2018_item(line: str) -> _Item:
    obj = _json_object(line)
    return (
        _id(_required(obj, "asin"), "asin"),
        _text(obj.get("title")),
        _text(obj.get("description"), " "),
        (_text(obj.get("brand")), _text(obj.get("category"), ", ")),
    )


def _amazon2023_item(line: str) -> _Item:
    obj = _json_object(line)
    return (
        _id(_required(obj, "parent_asin"), "parent_asin"),
        _text(obj.get("title")),
        _text(obj.get("description"), " "),
        (
            _text(obj.get("main_category")),
            _text(obj.get("store")),
            _text(obj.get("features"), " "),
        ),
    )


def _recbole_item_parser(
    path: str, lines: Iterator[tuple[int, str]]
) -> tuple[_ItemParser, tuple[str, ...]]:
    line_no, names = _recbole_header(path, lines)
    _recbole_require(path, line_no, names, ("item_id",))
    n = len(names)
    ii = names.index("item_id")
    ti = next((names.index(t) for t in RECBOLE_TITLE_FIELDS if t in names), None)
    di = names.index("description") if "description" in names else None
    used = {ii, ti, di}
    extra_idx = [k for k in range(n) if k not in used]
    extras = tuple(names[k] for k in extra_idx)
    layout = ", ".join(names)

    def parse(line: str) -> _Item:
        f = _fields(line, "\t", n, layout)
        return (
            _id(f[ii], "item_id"),
            _tsv_text(f[ti]) if ti is not None else None,
            _tsv_text(f[di]) if di is not None else None,
            tuple(_tsv_text(f[k]) for k in extra_idx),
        )

    return parse, extras


def read_items(path: str, fmt: str, encoding: str | None = None) -> tuple[pa.Table, list[BadLine]]:
    """Read an item (metadata) file into RAW_ITEMS_SCHEMA plus extra string columns.

    Extras per format: grouplens-100k `genres`, `release_date`; grouplens-1m `genres`;
    amazon-2018 `brand`, `category`; amazon-2023 `main_category`, `store`, `features`;
    recbole every header field that is not the id, title or description, by its name.
    A later line repeating an item id is dropped (first occurrence wins: Amazon's meta files
    repeat items) and counted in a log message; it is not a bad line.
    """
    _check_format(fmt)
    _check_exists(path)
    if encoding is not None:
        _check_encoding(encoding)
    lines = _numbered_lines(path, encoding or _ITEM_ENCODING[fmt])
    parse: _ItemParser
    if fmt == "recbole":
        parse, extras = _recbole_item_parser(path, lines)
    else:
        parse = {
            "grouplens-100k": _ml100k_item,
            "grouplens-1m": _ml1m_item,
            "amazon-2018": _amazon2018_item,
            "amazon-2023": _amazon2023_item,
        }[fmt]
        extras = _ITEM_EXTRAS[fmt]
    clash = [e for e in extras if e in RAW_ITEMS_SCHEMA.names]
    if clash:  # cannot happen for fixed formats; a RecBole header could only via a bug here
        raise DataFormatError(path, f"extra field(s) {', '.join(clash)} clash with the schema")

    ids: list[str] = []
    titles: list[str | None] = []
    descs: list[str | None] = []
    extra_cols: list[list[str | None]] = [[] for _ in extras]
    seen: set[str] = set()
    bad: list[BadLine] = []
    dupes = 0
    for line_no, line in lines:
        try:
            item_id, title, desc, extra = parse(line)
        except _Bad as exc:
            bad.append(_bad_line(path, line_no, exc.reason, line))
            continue
        if item_id in seen:
            dupes += 1
            continue
        seen.add(item_id)
        ids.append(item_id)
        titles.append(title)
        descs.append(desc)
        for col, value in zip(extra_cols, extra, strict=True):
            col.append(value)

    if dupes:
        log.info("%s: %d repeated item id(s) ignored, first occurrence kept", path, dupes)
    _log_bad(path, len(bad), bad[0] if bad else None, len(ids))
    if not ids:
        raise _no_valid_line(path, fmt, "item", len(bad), bad[0] if bad else None)
    schema = RAW_ITEMS_SCHEMA
    for name in extras:
        schema = schema.append(pa.field(name, pa.string()))
    columns: dict[str, list[Any]] = {"item_id": ids, "title": titles, "description": descs}
    columns.update(zip(extras, extra_cols, strict=True))
    return pa.table(columns, schema=schema), bad


# --------------------------------------------------------------------------------------------
# Finding a data set's files in a directory


def _list_dir(directory: str) -> list[str]:
    """File names directly under `directory` (a local or remote one, or "archive.zip!prefix")."""
    split = _split_archive(directory)
    with _filesystem(directory) as (fs, inner, _):
        inner = inner.strip("/") if split else inner
        if inner and not fs.isdir(inner):
            if split:
                raise FileNotFoundError(f"no member under {split[1].strip('/')!r} in {split[0]}")
            raise FileNotFoundError(errno.ENOENT, "no such directory", directory)
        entries = fs.ls(inner, detail=True)
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")
    if split and not names:
        raise FileNotFoundError(f"no member under {split[1].strip('/')!r} in {split[0]}")
    return names


def _join(directory: str, name: str) -> str:
    if _split_archive(directory) is not None:
        return directory.rstrip("/") + "/" + name
    return os.path.join(directory, name)


def _amazon_by_category(names: list[str], suffix: str) -> tuple[dict[str, str], dict[str, str]]:
    """Map category -> file for reviews and meta; gzipped wins over plain, full over _5."""
    reviews: dict[str, tuple[int, str]] = {}
    meta: dict[str, tuple[int, str]] = {}
    for name in names:
        stem = name[:-3] if name.endswith(".gz") else name
        if not stem.endswith(suffix):
            continue
        cat = stem[: -len(suffix)]
        rank = 0 if name.endswith(".gz") else 1
        if cat.startswith("meta_"):
            target, cat = meta, cat[len("meta_") :]
        else:
            target = reviews
            if cat.endswith("_5"):  # the 2018 5-core subset: used only without the full file
                cat, rank = cat[:-2], rank + 2
        if not cat:
            continue
        if cat not in target or rank < target[cat][0]:
            target[cat] = (rank, name)
    return {c: n for c, (_, n) in reviews.items()}, {c: n for c, (_, n) in meta.items()}


def find_source_files(directory: str, fmt: str) -> tuple[list[str], list[str]]:
    """Find a format's default files in `directory`: (interaction files, item files).

    grouplens-100k: u.data, u.item; grouplens-1m: ratings.dat, movies.dat; recbole: *.inter,
    *.item; amazon-2018: {Category}.json(.gz) with meta_{Category}.json(.gz); amazon-2023:
    {Category}.jsonl(.gz) with meta_{Category}.jsonl(.gz). Amazon lists are in category order
    and paired: a category without both files is an error, since items without reviews (or
    reviews without titles) would silently shrink the data set. `directory` may be
    "archive.zip!folder".
    """
    _check_format(fmt)
    names = _list_dir(directory)
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    inter: list[str]
    items: list[str]
    if fmt in ("grouplens-100k", "grouplens-1m"):
        want = ("u.data", "u.item") if fmt == "grouplens-100k" else ("ratings.dat", "movies.dat")
        missing = [w for w in want if w not in names]
        if missing:
            raise FileNotFoundError(
                f"{directory}: no {' or '.join(missing)} for format {fmt} (found: {shown})"
            )
        inter, items = [want[0]], [want[1]]
    elif fmt == "recbole":
        inter = [n for n in names if n.endswith(".inter")]
        items = [n for n in names if n.endswith(".item")]
        if not inter or not items:
            need = "*.inter" if not inter else "*.item"
            raise FileNotFoundError(
                f"{directory}: no {need} file for format recbole (found: {shown})"
            )
    else:
        suffix = ".json" if fmt == "amazon-2018" else ".jsonl"
        reviews, meta = _amazon_by_category(names, suffix)
        if not reviews or not meta:
            prefix = "meta_" if reviews else ""
            need = f"{prefix}{{Category}}{suffix}(.gz)"
            raise FileNotFoundError(
                f"{directory}: no {need} file for format {fmt} (found: {shown})"
            )
        unpaired = sorted(set(reviews) ^ set(meta))
        if unpaired:
            raise DataFormatError(
                directory,
                f"expected a reviews and a meta_ file for each category; unpaired: "
                f"{', '.join(unpaired)}",
            )
        cats = sorted(reviews)
        inter, items = [reviews[c] for c in cats], [meta[c] for c in cats]
    return [_join(directory, n) for n in inter], [_join(directory, n) for n in items]
