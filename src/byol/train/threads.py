"""CPU threads that make room for a busy neighbour.

torch runs its CPU kernels on one OpenMP thread per core, and every parallel region ends at a
barrier. When another process keeps a core busy, the thread that shares that core with it
arrives late at every barrier while the others spin waiting for it: on a 2-core machine beside
one busy process a step took 10x as long (docs/benchmarks.md, "Beside a busy process").
With one thread fewer than the cores the others leave free, nothing waits at a barrier for a
core it cannot have.

``ThreadGovernor`` measures, every ``interval`` seconds, how much CPU time the machine spent
outside this process and its children (the DataLoader workers), from ``/proc/stat`` and
``/proc/<pid>/stat``, and sets ``torch.set_num_threads`` to the cores left free (at least one,
at most the count the run started with). It is on only when ``train.threads`` is unset on the
CPU: an explicit thread count is kept as given (and keeps a run's arithmetic the same across
sessions: a different thread count may round differently). Linux only; elsewhere it does
nothing.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
NOISE_CORES = 0.15  # other processes below this many busy cores do not count (system noise)


class CpuSample(NamedTuple):
    busy: float  # CPU seconds the whole machine spent busy (all cores)
    ours: float  # CPU seconds of this process and its child processes


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; a container's own cores)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def machine_busy_seconds(cpus: set[int] | None = None) -> float:
    """Busy CPU seconds since boot of the CPUs ``cpus`` (default: those this process may use),
    from their ``cpuN`` lines of /proc/stat: other tenants' cores of a shared host do not count."""
    cpus = usable_cpus() if cpus is None else cpus
    total = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu"):
                break  # the cpuN lines come first, right after the total line
            if name != "cpu" and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (
                    int(x) for x in (fields + ["0"] * 8)[:8])
                total += user + nice + system + irq + softirq + steal
    return total / _CLK


def _proc_cpu(stat_line: str) -> tuple[int, float]:
    """(parent pid, utime + stime seconds) of one /proc/<pid>/stat line."""
    rest = stat_line[stat_line.rindex(")") + 2:].split()  # the name may hold spaces and parens
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK


def own_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds of process ``pid`` (all its threads) and of its live child processes."""
    pid = os.getpid() if pid is None else pid
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid, cpu = _proc_cpu(f.read())
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        if int(entry.name) == pid or ppid == pid:
            total += cpu
    return total


def sample_cpu() -> CpuSample:
    return CpuSample(machine_busy_seconds(), own_cpu_seconds())


def threads_for(other_cores: float, max_threads: int, cores: int) -> int:
    """Threads to run beside others that keep ``other_cores`` cores busy (rounded up once above
    the noise), at least 1, at most ``max_threads``."""
    taken = max(0, math.ceil(other_cores - NOISE_CORES))
    return max(1, min(max_threads, cores - taken))


class ThreadGovernor:
    """Call ``tick()`` once per step: a clock read, and every ``interval`` seconds a look at the
    machine (a few milliseconds of reading /proc)."""

    def __init__(self, max_threads: int, *, interval: float = 5.0, cores: int | None = None,
                 clock: Callable[[], float] = time.monotonic, sample: Callable[[], CpuSample] = sample_cpu,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self.interval = interval
        self.cores = cores or len(usable_cpus())
        self.other_cores = 0.0  # the last reading
        self._clock, self._sample, self._set = clock, sample, set_threads
        self._t, self._last = clock(), sample()

    def tick(self) -> int | None:
        """-> the new thread count when it changed, else None."""
        t = self._clock()
        if t - self._t < self.interval:
            return None
        now = self._sample()
        busy, ours = now.busy - self._last.busy, now.ours - self._last.ours
        self.other_cores = max(0.0, busy - ours) / (t - self._t)
        self._t, self._last = t, now
        threads = threads_for(self.other_cores, self.max_threads, self.cores)
        if threads == self.threads:
            return None
        self.threads = threads
        self._set(threads)
        return threads


    def restore(self) -> None:
        """Back to the count the run started with (the next run, an evaluation, a sweep's next
        cell start from it)."""
        if self.threads != self.max_threads:
            self.threads = self.max_threads
            self._set(self.max_threads)


def make_governor(threads_setting: int | None, device: torch.device) -> ThreadGovernor | None:
    """The governor of a CPU run whose ``train.threads`` is unset (None where it cannot measure)."""
    if threads_setting is not None or device.type != "cpu" or not os.path.exists("/proc/stat"):
        return None
    if torch.get_num_threads() < 2:
        return None
    try:
        return ThreadGovernor(torch.get_num_threads())
    except (OSError, ValueError):
        return None
