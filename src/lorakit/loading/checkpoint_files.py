"""A model folder's weight files, checked before anything is loaded, and read one tensor at a time.

    model.safetensors                          one file
    model.safetensors.index.json + shards      {"weight_map": {tensor name: shard file}}
    a .gguf file                               converted once to a cached folder (lorakit.models), then as above

`open_checkpoint(folder)` reads only the headers (a few KiB per file): every shard the index names must exist,
every file's data must be as long as its header says (a truncated or corrupt download is caught here, not
halfway through loading), and every tensor the index lists must be in its shard. `CheckpointFiles.read(name)`
then returns one tensor, read from the memory-mapped file into private memory; `CheckpointFiles.mapped(name)`
returns it as a view of a private (copy-on-write) mapping of its file instead: its pages are the page cache's, which
the kernel can drop and read again, and they never count as the process's private memory.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
_MAX_HEADER = 100 * 2 ** 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor is and what it is, from its file's header."""
    name: str
    file: Path
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # where its data starts in the file, in bytes

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype, (None, 0))[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES.get(self.dtype, (None, 0))[1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Returns {name: TensorInfo} of one safetensors file; raises ModelLoadError when it is truncated or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"Checkpoint file {path} does not exist.") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"Checkpoint file {path} is not a readable safetensors file ({e}); it may be "
                             f"corrupt or an incomplete download: download it again.") from None
    out, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"Checkpoint file {path}: the header entry of tensor {name!r} is malformed; the file "
                                 f"is corrupt: download it again.") from None
        if dtype not in DTYPES or DTYPES[dtype][0] is None:
            raise ModelLoadError(f"Checkpoint file {path}: tensor {name!r} has dtype {dtype}, which this PyTorch "
                                 f"cannot represent.")
        if b - a != math.prod(shape) * DTYPES[dtype][1]:
            raise ModelLoadError(f"Checkpoint file {path}: tensor {name!r} ({dtype}, shape {list(shape)}) has "
                                 f"{b - a} bytes of data; the file is corrupt: download it again.")
        out[name] = TensorInfo(name, path, dtype, shape, 8 + n + a)
        end = max(end, b)
    if size != 8 + n + end:
        raise ModelLoadError(f"Checkpoint file {path} is truncated or corrupt: its header describes {8 + n + end} "
                             f"bytes but the file has {size}. Download it again.")
    return out


class CheckpointFiles:
    """A checked set of safetensors files: `tensors` maps every stored name to its TensorInfo."""

    def __init__(self, folder: Path, files: list[Path], tensors: dict[str, TensorInfo]):
        self.folder, self.files, self.tensors = folder, files, tensors
        self._open: dict[Path, object] = {}
        self._maps: dict[Path, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def stored_dtype(self) -> torch.dtype | None:
        """Returns the most common floating dtype of the stored tensors (by bytes), or None when there are none."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.torch_dtype is not None and t.torch_dtype.is_floating_point:
                by[t.torch_dtype] = by.get(t.torch_dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else None

    def read(self, name: str) -> torch.Tensor:
        """Returns tensor `name` in its stored dtype, in private CPU memory (one tensor: never the whole file)."""
        from safetensors import safe_open
        info = self.tensors[name]
        handle = self._open.get(info.file)
        try:
            if handle is None:
                handle = self._open[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            return handle.get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"Could not read tensor {name!r} from {info.file}: {e}") from None

    def mapped(self, name: str) -> torch.Tensor | None:
        """Returns tensor `name` as a view of a private memory map of its file (read-only use: a write copies the
        touched pages into private memory, never into the file), or None when its bytes are not aligned for a
        view. The mapping lives as long as the tensor; a file truncated while mapped makes its reader crash."""
        info = self.tensors[name]
        whole = self._maps.get(info.file)
        try:
            if whole is None:
                storage = torch.UntypedStorage.from_file(str(info.file), shared=False,
                                                         nbytes=info.file.stat().st_size)
                whole = self._maps[info.file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"Could not map {info.file}: {e}") from None
        size = DTYPES[info.dtype][1]
        if info.offset % size:
            return None
        return whole[info.offset: info.offset + info.nbytes].view(info.torch_dtype).view(info.shape)

    def close(self) -> None:
        self._open.clear()
        self._maps.clear()  # the tensors already returned keep their own mapping alive


def open_checkpoint(folder: str | Path) -> CheckpointFiles:
    """Returns the checked weight files of a model folder; raises ModelLoadError naming the file that is wrong."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"Checkpoint index {index} is unreadable ({type(e).__name__}: {e}).") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"Checkpoint index {index} names {len(names)} shard files, but "
                                 f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                                 f"{'is' if len(missing) == 1 else 'are'} missing from {folder}: download "
                                 f"the missing shard(s) again.")
        files = [folder / n for n in names]
        headers = {f: read_header(f) for f in files}
        tensors = {}
        for name, shard in weight_map.items():
            info = headers[folder / shard].get(name)
            if info is None:
                raise ModelLoadError(f"Checkpoint index {index} puts tensor {name!r} in {shard}, but that shard "
                                     f"does not contain it; the index and the shards do not belong together.")
            tensors[name] = info
        return CheckpointFiles(folder, files, tensors)
    single = folder / SINGLE_NAME
    files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")] \
            if folder.is_dir() else []
        hint = (f" It has {', '.join(other[:3])} (pickle files, which lorakit's streaming loader does not read: "
                f"convert them to safetensors)" if other else "")
        raise ModelLoadError(f"Model folder {folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}).{hint}")
    tensors = {}
    for f in files:
        tensors.update(read_header(f))
    return CheckpointFiles(folder, files, tensors)
