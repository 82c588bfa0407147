"""Reading user data: JSON/JSONL rows and text files here; Parquet, CSV, dataset folders and hub ids through
`datasets` (sources.py); --columns renames first (columns.py); each row validated by its format."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lorakit.errors import DataError
from lorakit.train.data.columns import rename_columns
from lorakit.train.data.formats import known_fields, row_kind, validate_row
from lorakit.train.data.sources import dataset_rows, is_dataset_spec


TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass
class LoadedData:
    """Records of one format read from a file or folder; `skipped` counts bad rows when skipping is on."""
    records: list[dict]
    kind: str  # "alpaca" | "chat" | "sharegpt" | "text"
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


def collect(path, rows: Iterable[tuple[int, object]], skip_bad_rows: bool, where: str = "line",
            columns: dict[str, str] | None = None) -> LoadedData:
    """Returns validated records; the first row that has a known format decides the file's format.

    `columns` maps a format's field to the column holding it ({"instruction": "question"}), applied first.
    """
    records, problems, kind = [], [], None
    for lineno, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if columns:
                row = rename_columns(row, columns)
            if kind is None and isinstance(row, dict):
                kind = row_kind(row)
                if kind is None:
                    raise ValueError(f"<row>: no {known_fields()} field; its columns are {', '.join(map(str, row))} "
                                     f"(map them with --columns instruction=COL,output=COL)")
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


def load_saved_datasets(path: Path, skip_bad_rows: bool, columns: dict[str, str] | None = None,
                        split: str | None = None) -> LoadedData:
    """Returns records from a folder written by `datasets.Dataset.save_to_disk` (lorakit.train.data.sources)."""
    return collect(path, dataset_rows(path, split=split), skip_bad_rows, where="row", columns=columns)


def load_records(path: str | os.PathLike, *, skip_bad_rows: bool = False, columns: dict[str, str] | None = None,
                 split: str | None = None, config: str | None = None, prefer: str = "train") -> LoadedData:
    """Returns the records at `path`: JSON/JSONL (Alpaca, chat or ShareGPT), text, Parquet/CSV, a `datasets`
    folder, or a dataset id / folder that `datasets.load_dataset` reads (split, config; see sources.py).
    """
    if is_dataset_spec(path):  # Parquet, CSV, folders and dataset ids: through `datasets`
        rows = dataset_rows(path, split=split, config=config, prefer=prefer)
        return collect(path, rows, skip_bad_rows, where="row", columns=columns)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8", errors="replace")
        return collect(path, json_rows(path, text), skip_bad_rows, columns=columns)
    if suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return LoadedData([{"text": text}], "text", str(path))
    raise DataError(f"{path}: unknown data format '{suffix}'; use .json, .jsonl (Alpaca, chat or ShareGPT), "
                    f".parquet, .csv, .tsv or .txt.")
