"""lorakit.loading.allocator: freed large buffers go back to the OS at once (glibc), measured in a subprocess."""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A training step's pattern: a large buffer freed (which raises glibc's dynamic mmap threshold), then many
# mid-size buffers interleaved with small ones that stay alive, then the mid-size ones freed.
CHURN = """
import sys, torch
from lorakit.loading.allocator import return_freed_memory_promptly
from lorakit.loading.memwatch import rss_anon
if sys.argv[1] == "on":
    assert return_freed_memory_promptly()
big = torch.ones(30 * 2 ** 20 // 4); del big
before = rss_anon()
keep, churn = [], []
for i in range(150):
    churn.append(torch.ones(2 * 2 ** 20 // 4))
    keep.append(torch.ones(64 * 1024 // 4))
del churn
print(rss_anon() - before)
"""


@pytest.mark.skipif("glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "").lower()
                    and not ctypes.util.find_library("c"), reason="glibc malloc only")
def test_freed_buffers_return_to_the_os():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    kept = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, check=True)
        kept[mode] = int(out.stdout.split()[-1])
    mib = 2 ** 20
    assert kept["off"] > 200 * mib, kept  # glibc's default keeps most of the 300 MiB freed in heap holes
    assert kept["on"] < 40 * mib, kept    # with the policy only the 150 small live buffers (~10 MiB) remain
