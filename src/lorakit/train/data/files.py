"""Reading user data: JSON/JSONL rows, text files, `datasets` folders; each row validated by its format."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lorakit.errors import DataError
from lorakit.train.data.formats import known_fields, row_kind, validate_row


TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass
class LoadedData:
    """Records of one format read from a file or folder; `skipped` counts bad rows when skipping is on."""
    records: list[dict]
    kind: str  # "alpaca" | "chat" | "text"
    source: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def json_rows(path: Path, text: str) -> Iterable[tuple[int, object]]:
    """Yields (1-based line, row) from a .jsonl file, or from a .json array/object with a list of rows."""
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, ValueError(f"<json>: invalid JSON ({e.msg} at column {e.colno})")
        return
    dec = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        rows = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else [obj]
        yield from ((1, r) for r in rows)
        return
    # Walk the array element by element so each row's error can name the line it starts on.
    i = start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        lineno = text.count("\n", 0, i) + 1
        try:
            row, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield lineno, row


def collect(path: Path, rows: Iterable[tuple[int, object]], skip_bad_rows: bool, where: str = "line") -> LoadedData:
    """Returns validated records; the first row that has a known format decides the file's format."""
    records, problems, kind = [], [], None
    for lineno, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if kind is None and isinstance(row, dict):
                kind = row_kind(row)
                if kind is None:
                    raise ValueError(f"<row>: no {known_fields()} field")
            records.append(validate_row(row, kind or "alpaca"))
        except ValueError as e:
            fld, _, what = str(e).partition(": ")
            msg = f"{path}, {where} {lineno}, field '{fld}': {what}"
            if not skip_bad_rows:
                raise DataError(msg + " (use --skip-bad-rows to skip malformed rows)") from None
            problems.append(msg)
    if not records:
        raise DataError(f"{path}: no usable rows" + (f" ({len(problems)} malformed)" if problems else ""))
    return LoadedData(records, kind or "alpaca", str(path), len(problems), problems)


def load_saved_datasets(path: Path, skip_bad_rows: bool) -> LoadedData:
    """Returns records from a folder written by `datasets.Dataset.save_to_disk`."""
    try:
        import datasets  # optional dependency; only needed for this one format
    except ImportError:
        raise DataError(f"{path} is a folder saved by the `datasets` library, which is not installed. "
                        f"Install it (pip install datasets) or export the data to JSONL.") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return collect(path, ((i + 1, dict(r)) for i, r in enumerate(ds)), skip_bad_rows, where="row")


def load_records(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> LoadedData:
    """Returns the records in a JSON/JSONL (Alpaca or chat), text file, or `datasets` folder at `path`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return load_saved_datasets(path, skip_bad_rows)
        raise DataError(f"{path} is a folder but not one saved by `datasets`; pass a .json, .jsonl or .txt file.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8", errors="replace")
        return collect(path, json_rows(path, text), skip_bad_rows)
    if suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return LoadedData([{"text": text}], "text", str(path))
    raise DataError(f"{path}: unknown data format '{suffix}'; use .json, .jsonl (Alpaca or chat) or .txt.")
