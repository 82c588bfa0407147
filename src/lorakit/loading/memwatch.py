"""Peak private memory of a process: RssAnon from /proc/PID/status, sampled by a watcher thread.

RssAnon counts anonymous (private) resident pages only; plain RSS also counts a memory-mapped checkpoint's
file pages, which the kernel drops whenever it needs the room. Linux only.
"""
from __future__ import annotations

import subprocess
import threading
import time


def rss_anon(pid: int | str = "self") -> int:
    """Returns the RssAnon of process `pid` in bytes (0 when it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakWatcher:
    """Samples RssAnon of `pid` every `interval` seconds in a thread; `.peak` is the largest seen (bytes)."""

    def __init__(self, pid: int | str = "self", interval: float = 0.005):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon(self.pid))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon(self.pid))


def run_measured(argv: list[str], *, env=None, timeout: float | None = None, interval: float = 0.01):
    """Runs `argv` as a subprocess; returns (returncode, peak RssAnon bytes, stdout, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watcher = PeakWatcher(proc.pid, interval)
    with watcher:
        out, err = proc.communicate(timeout=timeout)
    return proc.returncode, watcher.peak, out, err
