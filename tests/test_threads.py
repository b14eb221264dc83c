"""The thread governor: fewer torch threads while other processes keep cores busy, all of them
again once they stop; measured from /proc of a real process tree."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from byol.config import load_config
from byol.train.pretrain import pretrain
from byol.train.threads import CpuSample, ThreadGovernor, machine_busy_seconds, own_cpu_seconds, threads_for
from conftest import TINY

linux = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc (Linux)")


@pytest.mark.parametrize("others, max_threads, cores, expected", [
    (0.0, 2, 2, 2), (0.1, 2, 2, 2),  # noise: keep every thread
    (0.3, 2, 2, 1), (1.0, 2, 2, 1), (1.9, 2, 2, 1),  # a neighbour on a 2-core machine: one thread
    (5.0, 2, 2, 1),  # never fewer than one
    (1.0, 16, 16, 15), (2.6, 16, 16, 13), (0.0, 8, 16, 8),  # never more than the run started with
])
def test_threads_for_leaves_the_cores_others_use(others, max_threads, cores, expected):
    assert threads_for(others, max_threads, cores) == expected


class _FakeMachine:
    """A clock and CPU counters that advance as the test says."""

    def __init__(self):
        self.t, self.busy, self.ours, self.samples = 0.0, 0.0, 0.0, 0

    def run(self, seconds, ours_cores, other_cores):
        self.t += seconds
        self.ours += seconds * ours_cores
        self.busy += seconds * (ours_cores + other_cores)

    def sample(self):
        self.samples += 1
        return CpuSample(self.busy, self.ours)


def test_governor_drops_a_thread_beside_a_neighbour_and_takes_it_back():
    m, calls = _FakeMachine(), []
    gov = ThreadGovernor(2, interval=5.0, cores=2, clock=lambda: m.t, sample=m.sample, set_threads=calls.append)
    m.run(4.0, 2.0, 0.0)
    assert gov.tick() is None and m.samples == 1  # before the interval: a clock read, no sample
    m.run(2.0, 2.0, 0.02)
    assert gov.tick() is None and gov.threads == 2  # alone (noise only)
    m.run(6.0, 1.5, 0.5)  # a busy process arrives and gets half a core from us
    assert gov.tick() == 1 and calls == [1] and gov.other_cores == pytest.approx(0.5)
    m.run(6.0, 1.0, 1.0)
    assert gov.tick() is None  # still there: still one thread
    m.run(6.0, 1.0, 0.0)  # it stopped
    assert gov.tick() == 2 and calls == [1, 2]


def _spin_detached(seconds: float) -> int:
    """A CPU-bound process that is not our child (its parent exits at once) -> its pid."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            f"'import time\\nt = time.time()\\nwhile time.time() - t < {seconds}: pass'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@linux
def test_cpu_accounting_counts_children_as_ours_and_strangers_as_others():
    before = own_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    time.sleep(1.2)
    assert own_cpu_seconds() - before > 0.8  # the live child's CPU time is ours
    child.wait()
    stranger = _spin_detached(3.0)
    try:
        time.sleep(0.5)  # let the stranger start spinning
        busy0 = machine_busy_seconds()
        gov = ThreadGovernor(2, interval=1.5, cores=os.cpu_count(), set_threads=lambda n: None)
        time.sleep(1.6)
        gov.tick()
        assert machine_busy_seconds() - busy0 > 1.0  # the machine's counters saw it too
        assert gov.other_cores > 0.6  # one spinning process that is not ours: about one core
        assert gov.threads == threads_for(gov.other_cores, 2, os.cpu_count())
    finally:
        try:
            os.kill(stranger, signal.SIGKILL)
        except ProcessLookupError:
            pass


@linux
def test_a_run_with_unset_threads_logs_its_thread_count(tmp_path):
    torch.set_num_threads(2)  # the autouse fixture restores one thread afterwards
    cfg = load_config(None, [*[x for x in TINY if not x.startswith("train.threads")], "data.dataset=shapes",
                             "data.shapes_size=48", "data.val_fraction=0", "optim.epochs=1",
                             f"train.out_dir={tmp_path}", "train.name=run", "eval.final_knn=false"])
    assert cfg.train.threads is None
    run = pretrain(cfg).run_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["threads"] in (1, 2) for r in rows)
    pinned = pretrain(load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48",
                                         "data.val_fraction=0", "optim.epochs=1", f"train.out_dir={tmp_path}",
                                         "train.name=pinned", "eval.final_knn=false"])).run_dir
    assert all("threads" not in json.loads(x) for x in (pinned / "metrics.jsonl").read_text().splitlines())
