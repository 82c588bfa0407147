"""Single-file outputs (a .gguf, a Modelfile): checked before any work, written to a temporary file in the same
folder and renamed into place, so a failed or interrupted export never leaves a partial file behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io.atomic import check_parents


def check_output_file(path: str | os.PathLike, force: bool = False) -> Path:
    """Returns `path` as a Path when a file may be written there; LorakitError otherwise (folder, exists, bad parent)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise LorakitError(f"{out} is a folder; --out names the file to write (for example {out / 'model.gguf'}).")
    if out.exists() and not force:
        raise LorakitError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    check_parents(out)
    return out


def check_disk(path: Path, need_bytes: int, what: str = "the output") -> None:
    """Raises LorakitError when the file system holding `path` has less than need_bytes (+5%, +16 MB) free."""
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need_bytes * 1.05) + (16 << 20)
    if free < need:
        raise LorakitError(f"not enough free disk space in {probe.resolve()}: {what} needs about {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are free. Free some space or choose --out elsewhere.")


@contextmanager
def atomic_file(path: Path):
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`, else removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
