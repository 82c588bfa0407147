"""The adapters a server knows, and the at most K of them that sit in the model, least recently used out first.

    known    name -> folder: from --adapter at start and POST /v1/load_lora_adapter at run time
    loaded   the names injected into the model now (<= max_loaded), in least-recently-used order

Requests name any known adapter; the engine calls `acquire` before a row joins the batch (loading it, and
unloading the least recently used adapter that no row is using when K are loaded) and `release` when the row
leaves. `forget` takes a name out of `known` at once; its weights leave the model when no row uses them.
Only the engine thread touches the model; the HTTP side reads `known` under the lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import lorakit
from lorakit.errors import ConfigError


class AdapterBusy(ConfigError):
    """Every loaded adapter is in use and no slot can be freed for another one right now."""


class AdapterPool:
    def __init__(self, model, max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ConfigError(f"--max-loaded-adapters must be >= 1, got {max_loaded}")
        self.model, self.max_loaded = model, max_loaded
        self.known: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.in_use: dict[str, int] = {}
        self.ever_loaded = False  # once any adapter was injected, rows must name theirs ("__base__" for none)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ any thread
    def names(self) -> list[str]:
        with self.lock:
            return list(self.known)

    def is_known(self, name: str) -> bool:
        with self.lock:
            return name in self.known

    def register(self, name: str, folder: Path) -> None:
        with self.lock:
            if name in self.known:
                raise ConfigError(f"an adapter named {name!r} is already loaded")
            if name in self.loaded:
                raise ConfigError(f"adapter {name!r} is still being unloaded (rows are using it); retry shortly")
            self.known[name] = folder

    def forget(self, name: str) -> None:
        with self.lock:
            if name not in self.known:
                raise KeyError(name)
            del self.known[name]

    # ------------------------------------------------------------------ engine thread only
    def load(self, name: str) -> None:
        """Injects `name` now (evicting the LRU idle adapter if K are loaded); AdapterBusy if none can go."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        with self.lock:
            folder = self.known.get(name)
        if folder is None:
            raise ConfigError(f"adapter {name!r} is not known")
        if self.max_loaded is not None and len(self.loaded) >= self.max_loaded:
            idle = [n for n in self.loaded if not self.in_use.get(n)]
            if not idle:
                raise AdapterBusy(f"all {self.max_loaded} loaded adapters are in use")
            self._unload(idle[0])
        lorakit.load_adapter(self.model, folder, adapter_name=name, activate=False)
        self.loaded[name] = None
        self.ever_loaded = True

    def acquire(self, name: str | None) -> None:
        if name is None:
            return
        self.load(name)
        self.in_use[name] = self.in_use.get(name, 0) + 1

    def release(self, name: str | None) -> None:
        if name is None:
            return
        self.in_use[name] -= 1
        if not self.in_use[name]:
            del self.in_use[name]
        self.collect()

    def collect(self) -> None:
        """Unloads adapters that were forgotten and are no longer used by any row."""
        with self.lock:
            gone = [n for n in self.loaded if n not in self.known and not self.in_use.get(n)]
        for n in gone:
            self._unload(n)

    def _unload(self, name: str) -> None:
        lorakit.delete_adapter(self.model, name)
        del self.loaded[name]
