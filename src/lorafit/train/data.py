"""Reading training data: csv, tsv and jsonl, with errors that name the file, line and column.

CSV and TSV go through Python's ``csv`` module (standard quoting: a field may be quoted and hold
the delimiter, quotes or newlines), so the line of a row is the physical line where it starts.
Files are decoded as UTF-8 (a BOM is dropped); anything else is refused with the line of the
first bad byte rather than guessed, since a wrong guess silently corrupts text.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}


@dataclasses.dataclass
class Table:
    """Rows of one data file.

    Attributes:
        path: the file, as given (used in messages).
        columns: header names (csv/tsv) or the union of keys (jsonl), in first-seen order.
        rows: ``(line, record)`` pairs; ``line`` is 1-based and counts the header.
    """

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]

    def require(self, *names: str) -> None:
        """Fail unless every column in ``names`` exists (all rows for jsonl)."""
        for name in names:
            if name not in self.columns:
                have = ", ".join(self.columns) or "none"
                raise LorafitError(f"{self.path}: no column {name!r} (columns: {have})")
            for line, rec in self.rows:
                if name not in rec or rec[name] is None:
                    raise LorafitError(f"{self.path} line {line}: missing value in column {name!r}")

    def nonempty(self) -> Table:
        """Fail on a file without data rows; returns self for chaining."""
        if not self.rows:
            raise LorafitError(f"{self.path}: no data rows")
        return self


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a directory, expected a data file") from None
    except OSError as exc:
        raise LorafitError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LorafitError(
            f"{path} line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, text: str, delimiter: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return Table(path, [], [])
        header = [h.strip() for h in header]
        _refuse_other_delimiter(path, header, delimiter)
        rows = []
        start = reader.line_num + 1
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields or all(not f.strip() for f in fields):
                continue  # blank lines carry no example
            if len(fields) > len(header):
                raise LorafitError(
                    f"{path} line {line}: {len(fields)} fields but the header has {len(header)}"
                )
            rec = dict(zip(header, fields))  # a short row leaves columns missing -> named by require()
            rows.append((line, rec))
    except csv.Error as exc:
        raise LorafitError(f"{path} line {reader.line_num}: malformed {path.suffix[1:]} ({exc})") from None
    return Table(path, header, rows)


def _refuse_other_delimiter(path: Path, header: list[str], delimiter: str) -> None:
    """A one-column header holding the other delimiter: a TSV saved as .csv (or the reverse).

    Read with the wrong delimiter such a file gives one column named ``text\tlabel``, or rows
    split at commas inside the text; naming the extension is the useful message.
    """
    other, kind, ext = ("\t", "tab", ".tsv") if delimiter == "," else (",", "comma", ".csv")
    if len(header) == 1 and other in header[0]:
        raise LorafitError(
            f"{path}: the header {header[0]!r} looks {kind}-separated; rename the file to {path.stem}{ext}"
        )


def _read_jsonl(path: Path, text: str) -> Table:
    rows, columns = [], {}
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"{path} line {line}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise LorafitError(f"{path} line {line}: expected a JSON object per line")
        columns.update(dict.fromkeys(rec))
        rows.append((line, rec))
    return Table(path, list(columns), rows)


def read_table(path: str | Path) -> Table:
    """Read a .csv, .tsv or .jsonl file into a :class:`Table`.

    Raises:
        LorafitError: missing/unreadable file, unknown extension, bad encoding, malformed rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise LorafitError(
            f"{path}: unsupported format {suffix or '(no extension)'!r} (use .csv, .tsv or .jsonl)"
        )
    text = _decode(path)
    delimiter = FORMATS[suffix]
    return _read_jsonl(path, text) if delimiter is None else _read_delimited(path, text, delimiter)


def take_samples(rows: list, n: int | None, seed: int) -> list:
    """``--max-samples``: a seeded shuffle of ``rows``, then the first ``n`` (all rows if ``n`` is None).

    Without ``n`` the file order is kept: the training order is shuffled per epoch anyway. The
    shuffle uses its own ``random.Random(seed)``, so the subset does not depend on anything else
    that consumed randomness before.
    """
    if n is None:
        return list(rows)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]
