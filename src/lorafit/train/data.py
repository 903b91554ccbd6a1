"""Reading training data: csv, tsv, jsonl, json, parquet, arrow and Hub datasets (``hf:NAME[:SPLIT]``).

Every format becomes a :class:`Table` (columns, ``(line, record)`` rows), so the tasks read all
of them the same way and name the file and line in their errors.

The text formats are read here, not through ``datasets`` (pandas' csv reader): their errors name
the line, and a value is never guessed (pandas reads ``NA`` / ``null`` / ``None`` as missing and
``007`` as the number 7). CSV and TSV go through Python's ``csv`` module (standard quoting: a
field may be quoted and hold the delimiter, quotes or newlines), so the line of a row is the
physical line where it starts. A ``.json`` file holds JSON Lines or one array of objects (each
row's line is where its object starts). Files are decoded as UTF-8 (a BOM is dropped); anything
else is refused with the line of the first bad byte rather than guessed, since a wrong guess
silently corrupts text.

Parquet and Arrow files (a ``datasets`` ``save_to_disk`` shard) and Hub datasets go through the
``datasets`` library (the ``hf`` extra), imported only for them. Their rows have no lines, so a
row's "line" is its 1-based row number; a ``ClassLabel`` column gives its label names (``-1``,
an unlabeled row, is a missing value). ``hf:NAME[:SPLIT]`` (split ``train`` by default) uses the
network unless the dataset is in the local cache; with ``HF_HUB_OFFLINE`` set and no cached copy
it is one error line, not a traceback.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": "json"}
DATASETS_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}  # read through the datasets library
HUB_PREFIX = "hf:"
EXTENSIONS = ".csv, .tsv, .jsonl, .json, .parquet or .arrow"


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


def _read_json(path: Path, text: str) -> Table:
    """A ``.json`` file: one array of objects (each row's line is where its object starts), or JSON Lines."""
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, text)
    try:
        json.loads(text)  # the whole document first: a syntax error anywhere is named with its line
    except json.JSONDecodeError as exc:
        raise LorafitError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    rows, columns = [], {}
    pos = space.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while text[pos] != "]":  # valid JSON: items separated by commas, up to the closing bracket
        line, counted = line + text.count("\n", counted, pos), pos
        rec, pos = decoder.raw_decode(text, pos)
        if not isinstance(rec, dict):
            raise LorafitError(f"{path} line {line}: expected an array of JSON objects")
        columns.update(dict.fromkeys(rec))
        rows.append((line, rec))
        pos = space.match(text, pos).end()
        if text[pos] == ",":
            pos = space.match(text, pos + 1).end()
    return Table(path, list(columns), rows)


def _datasets(what: str):
    """The ``datasets`` module, quiet; a one-line error naming ``what`` needs it when missing."""
    try:
        import datasets  # lazy: optional (the hf extra), seconds to import; only these formats need it
    except ImportError:
        raise LorafitError(f"{what}: reading it needs the datasets package (pip install 'lorafit[hf]')") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _from_dataset(path: Path, ds) -> Table:
    """A ``datasets.Dataset`` -> Table; rows numbered from 1; ClassLabel ints -> their names."""
    names = {c: f.names for c, f in ds.features.items() if type(f).__name__ == "ClassLabel"}
    rows = []
    for i, rec in enumerate(ds.to_list(), start=1):
        for column, labels in names.items():
            value = rec.get(column)
            rec[column] = labels[value] if isinstance(value, int) and 0 <= value < len(labels) else None
        rows.append((i, rec))
    return Table(path, list(ds.column_names), rows)


def _read_with_datasets(path: Path, builder: str) -> Table:
    if not path.exists():
        raise LorafitError(f"{path}: no such file")
    if path.is_dir():
        raise LorafitError(f"{path}: is a directory, expected a data file")
    datasets = _datasets(str(path))
    try:
        with tempfile.TemporaryDirectory(prefix="lorafit-data-") as cache:  # no copy left in ~/.cache
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - pyarrow / datasets raise many types for a bad file
        raise LorafitError(f"{path}: cannot read as {builder} ({_first_line(exc)})") from None
    return _from_dataset(path, ds)


def _read_hub(spec: str) -> Table:
    """``hf:NAME[:SPLIT]``: a dataset from the Hugging Face Hub (or the local datasets cache)."""
    name, _, split = spec[len(HUB_PREFIX):].partition(":")
    if not name:
        raise LorafitError(f"{spec}: give a dataset name (hf:NAME or hf:NAME:SPLIT)")
    datasets = _datasets(spec)
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, missing dataset or split, auth: all one line
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if offline:
            raise LorafitError(f"{spec}: HF_HUB_OFFLINE is set and the dataset is not in the local cache "
                               "(unset HF_HUB_OFFLINE to download it, or give a local file)") from None
        raise LorafitError(f"{spec}: cannot load the Hub dataset ({_first_line(exc)})") from None
    return _from_dataset(Path(spec), ds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_table(path: str | Path) -> Table:
    """Read a data file (or ``hf:NAME[:SPLIT]``) into a :class:`Table`; see the module doc for the formats.

    Raises:
        LorafitError: missing/unreadable file, unknown extension, bad encoding, malformed rows,
            a missing ``datasets`` package, a Hub dataset that cannot be loaded.
    """
    if str(path).startswith(HUB_PREFIX):
        return _read_hub(str(path))
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DATASETS_FORMATS:
        return _read_with_datasets(path, DATASETS_FORMATS[suffix])
    if suffix not in FORMATS:
        raise LorafitError(
            f"{path}: unsupported format {suffix or '(no extension)'!r} (use {EXTENSIONS}, or hf:NAME[:SPLIT])"
        )
    text = _decode(path)
    delimiter = FORMATS[suffix]
    if delimiter == "json":
        return _read_json(path, text)
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
