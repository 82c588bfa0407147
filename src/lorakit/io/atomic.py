"""Atomic folder writes: a crash at any point leaves the old folder or the new one, never a mix."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError


def atomic_write_dir(directory: str | os.PathLike, write) -> Path:
    """Calls write(tmp_dir), fsyncs its files, then renames tmp_dir to `directory`; returns the final path.

    An existing `directory` is replaced only after the new one is complete, so a crash at any point leaves
    either the old or the new folder, never a mix.
    """
    final = Path(directory)
    check_output_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_output_dir(directory: str | os.PathLike) -> Path:
    """Returns `directory` if a folder can be written there; raises LorakitError when a file is in the way."""
    final = Path(directory)
    if final.exists() and not final.is_dir():
        raise LorakitError(f"{final} exists and is a file; refusing to replace it with a folder. "
                           f"Choose another output path or move the file away.")
    check_parents(final)
    return final


def check_parents(path: Path) -> None:
    """Raises LorakitError when the nearest existing ancestor of `path` is a file (nothing can be created there)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LorakitError(f"cannot create {path}: {parent} is a file, not a folder. Choose another output path.")
            break
