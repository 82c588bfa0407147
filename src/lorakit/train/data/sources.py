"""Data that `datasets.load_dataset` reads: Parquet and CSV files, dataset folders, and hub dataset ids.

    --data train.parquet | train.csv | train.tsv      load_dataset("parquet" | "csv", data_files=FILE)
    --data some/folder                                 load_from_disk (saved by `datasets`) or load_dataset(FOLDER)
    --data tatsu-lab/alpaca [--data-split train] [--data-config NAME]    load_dataset(ID, NAME, split=SPLIT)

Rows then go through the same validation as JSONL rows (lorakit.train.data.files.collect), so an error
names the source, the row and the field. Without a network a hub id fails at once with one clear message.
`datasets` (and pyarrow) come with the `data` extra: pip install 'lorakit[data]'.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from lorakit.errors import DataError

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
OWN_SUFFIXES = {".json", ".jsonl", ".txt", ".md", ".text", ".rst"}  # read by files.py itself
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DATA_FILE_SUFFIXES = {".parquet", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".arrow"}  # what load_dataset reads
EVAL_SPLITS = ("validation", "valid", "val", "test", "eval")


def is_dataset_spec(spec: str | os.PathLike) -> bool:
    """Returns True when `spec` is read through `datasets`: a Parquet/CSV file, a folder, or a hub id."""
    p = Path(spec).expanduser()
    if p.exists():
        return p.is_dir() or p.suffix.lower() in FILE_BUILDERS
    text = str(spec)
    return bool(_HUB_ID.match(text)) and p.suffix.lower() not in OWN_SUFFIXES | set(FILE_BUILDERS)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading Parquet, CSV, dataset folders and hub datasets needs the `datasets` package: "
                        "pip install 'lorakit[data]' (or export the data to JSONL)") from None
    return datasets


def _pick_split(ds, split: str | None, prefer: str, where: str):
    """Returns one split of a DatasetDict: `split`, else `prefer` ('train', or 'eval': validation/test first)."""
    names = list(ds.keys())
    if split is not None:
        if split not in ds:
            raise DataError(f"{where}: no split {split!r}; it has {', '.join(names)} (choose one with --data-split)")
        return ds[split]
    for name in ((prefer,) if prefer != "eval" else EVAL_SPLITS) + ("train",):
        if name in ds:
            return ds[name]
    return ds[names[0]]


def _hub_unreachable_message(spec: str) -> str:
    return (f"--data {spec!r} is not a local file or folder, so it was taken for a Hugging Face hub dataset id, "
            f"and the hub is unreachable (no network) and the dataset is not in the local cache. Download it "
            f"where there is a network (datasets.load_dataset({spec!r})['train'].to_json('data.jsonl')) and pass "
            f"the file, or pass a local .jsonl, .json, .parquet or .csv file.")


def load_dataset_rows(spec: str | os.PathLike, split: str | None = None, config: str | None = None,
                      prefer: str = "train"):
    """Returns a `datasets.Dataset` for `spec` (file, folder or hub id); DataError with one clear message."""
    datasets = _datasets()
    from lorakit.loading.pretrained import hub_reachable

    p = Path(spec).expanduser()
    where = str(spec)
    sliced = split if split and "[" in split else None  # 'train[:1000]': datasets' own slicing
    try:
        if p.is_file():
            builder = FILE_BUILDERS[p.suffix.lower()]
            extra = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(builder, data_files={"train": str(p)}, split=sliced, **extra)
        elif p.is_dir() and any((p / m).exists() for m in _SAVED_MARKERS):
            ds = datasets.load_from_disk(str(p))
        elif p.is_dir():
            if not any(f.suffix.lower() in DATA_FILE_SUFFIXES for f in p.rglob("*") if f.is_file()):
                raise DataError(f"{p} is a folder but not one saved by `datasets`, and it holds no data files "
                                f"({', '.join(sorted(DATA_FILE_SUFFIXES))}) for datasets.load_dataset; pass a "
                                f".json, .jsonl, .parquet, .csv or .txt file")
            ds = datasets.load_dataset(str(p), name=config, split=sliced)
        else:
            if not hub_reachable() and not getattr(datasets.config, "HF_HUB_OFFLINE", False):
                raise DataError(_hub_unreachable_message(where))
            ds = datasets.load_dataset(where, name=config, split=split)
            split = None if not isinstance(ds, datasets.DatasetDict) else split
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs which source and why
        if not p.exists() and _offline(e):
            raise DataError(_hub_unreachable_message(where)) from None
        if "corresponds to no data" in str(e):
            raise DataError(f"{where}: no rows") from None
        raise DataError(f"--data {where}: datasets.load_dataset could not read it: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, prefer, where)
    return ds


def _offline(exc: BaseException) -> bool:
    """Returns True when `exc` (or its causes) says the hub could not be reached or the id is unknown offline."""
    markers = ("offline", "connect", "network", "resolve", "couldn't find", "doesn't exist on the hub",
               "not found", "cannot find", "local cache")
    while exc is not None:
        if any(m in f"{type(exc).__name__} {exc}".lower() for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def dataset_rows(spec: str | os.PathLike, *, split: str | None = None, config: str | None = None,
                 prefer: str = "train") -> Iterable[tuple[int, dict]]:
    """Returns (1-based row number, row) pairs of `spec` read by `datasets`, for the row validation."""
    ds = load_dataset_rows(spec, split, config, prefer)
    csv = Path(spec).suffix.lower() in (".csv", ".tsv")
    # CSV cells are text: a column of numbers ("42") must stay a string answer, not become an int.
    return ((i + 1, {k: (str(v) if csv and v is not None else v) for k, v in r.items()}) for i, r in enumerate(ds))
