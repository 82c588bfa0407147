"""Is the machine quiet enough for a timing to mean something? The ONE check every bench script uses.

    busy_jiffies()               the whole machine's busy CPU seconds since boot (/proc/stat)
    timed(fn)                    wall, this process's cores, the other processes' cores for one call of fn
    machine_load(seconds)        cores busy on the whole machine over the next `seconds`
    is_quiet(util, others, threads)   the rule: this process got ~threads cores and the rest stayed idle
    load_report()                /proc/loadavg as numbers, for the record next to every timing

A timing counts as quiet when the measured process got at least MIN_UTIL x its threads of CPU time for its
wall time and all other processes together used at most MAX_OTHER cores meanwhile. bench_train.py applies it
per step, vs_trl.py and results.py per run; a run that fails it is re-measured or published marked.
"""
from __future__ import annotations

import os
import time

MAX_OTHER = 0.25  # cores other processes may use during a quiet measurement
MIN_UTIL = 0.85   # fraction of its threads the measured process must get


def busy_jiffies() -> float:
    """Returns the machine's busy CPU time in seconds since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(fn, before=None, after=None) -> dict:
    """Runs fn() once; returns {wall, cpu, util, others}: seconds, this process's cores, the other processes' cores.

    `before` / `after` run just inside the timed span (a CUDA synchronize, for instance).
    """
    if before is not None:
        before()
    s0, c0, t0 = busy_jiffies(), time.process_time(), time.perf_counter()
    fn()
    if after is not None:
        after()
    t1, c1, s1 = time.perf_counter(), time.process_time(), busy_jiffies()
    wall, cpu = t1 - t0, c1 - c0
    return {"wall": wall, "cpu": cpu, "util": cpu / wall, "others": max(0.0, (s1 - s0) - cpu) / wall}


def machine_load(seconds: float = 1.0) -> float:
    """Returns the cores busy on the whole machine over the next `seconds` (the caller itself sleeps)."""
    s0, t0 = busy_jiffies(), time.perf_counter()
    time.sleep(seconds)
    return (busy_jiffies() - s0) / (time.perf_counter() - t0)


def is_quiet(util: float, others: float, threads: int, max_other: float = MAX_OTHER,
             min_util: float = MIN_UTIL) -> bool:
    """Returns True when a measurement ran alone: it got ~`threads` cores and the others stayed idle."""
    return others <= max_other and util >= min_util * threads


def quiet_verdict(util: float | None, others: float | None, threads: int, **kw) -> str:
    """Returns 'quiet', 'loaded' or 'unchecked' (no utilisation recorded) for a stored timing."""
    if util is None or others is None:
        return "unchecked"
    return "quiet" if is_quiet(util, others, threads, **kw) else "loaded"


def wait_quiet(max_wait: float, max_other: float = MAX_OTHER, log=print) -> float:
    """Waits up to max_wait seconds for the machine to go idle; returns the last load seen (cores)."""
    deadline = time.time() + max_wait
    load = machine_load(0.5)
    while load > max_other and time.time() < deadline:
        load = machine_load(2.0)
    if load > max_other:
        log(f"  machine busy: {load:.2f} cores used by other processes; measuring anyway")
    return load


def load_report() -> dict:
    """Returns {loadavg_1m, loadavg_5m, cores}: what /proc/loadavg said, to print next to a number."""
    one, five, _ = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "cores": os.cpu_count()}
