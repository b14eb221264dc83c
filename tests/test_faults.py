"""Faults with real processes and real signals: SIGKILL anywhere, a full disk, two writers.

Every scenario ends with the run finished and its online and target weights bitwise equal to
those of a run that never stopped, and its log holding each step once."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from byol.train.checkpoint import load_checkpoint
from faults import (
    TOTAL_STEPS,
    byol_command,
    checkpoint_model,
    logged_steps,
    run_byol,
    sigkill,
    start_byol,
    wait_for_step,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run that never stopped: its final weights and its losses."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = run_byol(byol_command(run), run)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return checkpoint_model(run / "checkpoints" / "last.pt"), {r["step"]: r["loss"] for r in rows}


def _assert_same_as_reference(run, reference):
    model, losses = reference
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == TOTAL_STEPS
    assert any(k.startswith("target_") for k in model)
    for key, value in model.items():  # online and target networks, BN statistics included
        assert torch.equal(final["model"][key], value), key
    steps = logged_steps(run)
    assert steps == list(range(1, TOTAL_STEPS + 1))  # each step once, in order
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in rows} == losses


def _temp_files(run):
    return sorted(p.name for p in (run / "checkpoints").glob(".*.tmp"))


def test_sigkill_in_a_write_between_renames_and_in_a_step_resumes_bitwise(tmp_path, reference):
    run = tmp_path / "run"
    # 1. SIGKILL halfway through writing the third checkpoint (step 6)
    killed = run_byol(byol_command(run), run, fault="kill_in_write:3")
    assert killed.returncode == -9
    assert len(_temp_files(run)) == 1  # the torn write is there, and was never renamed
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    # 2. resumed, then SIGKILL after last.pt became previous.pt, before the new file took its place
    killed = run_byol(byol_command(run, resume=True), run, fault="kill_between_renames:2")
    assert killed.returncode == -9
    assert not (run / "checkpoints" / "last.pt").exists()
    assert load_checkpoint(run / "checkpoints" / "previous.pt")["step"] == 6
    # 3. resumed (from previous.pt) and SIGKILLed from outside in the middle of training
    proc = start_byol(byol_command(run, resume=True), run)
    wait_for_step(proc, run, 13)
    sigkill(proc)
    # 4. resumed to the end
    done = run_byol(byol_command(run, resume=True), run)
    assert done.returncode == 0, done.stderr
    assert _temp_files(run) == []  # the leftovers of the killed writes are cleaned up
    _assert_same_as_reference(run, reference)


def test_disk_full_while_saving_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, reference):
    run = tmp_path / "run"
    full = run_byol(byol_command(run), run, fault="enospc:3")  # the third write (step 6) fails
    assert full.returncode == 4
    lines = full.stderr.strip().splitlines()
    assert "Traceback" not in full.stderr
    assert lines[-1].startswith("byol: error: cannot write a checkpoint in ")
    assert "no space left on device" in lines[-1] and "last.pt is intact" in lines[-1]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    assert load_checkpoint(run / "checkpoints" / "previous.pt")["step"] == 2
    assert _temp_files(run) == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is False
    done = run_byol(byol_command(run, resume=True), run)  # space freed: resume
    assert done.returncode == 0, done.stderr
    _assert_same_as_reference(run, reference)


def test_a_second_writer_is_refused_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    # a long run with a DataLoader worker (a forked child that could inherit a lock)
    proc = start_byol(byol_command(run, "optim.epochs=400", "data.num_workers=1"), run)
    try:
        wait_for_step(proc, run, 3)
        before = (run / "metrics.jsonl").read_text()
        second = run_byol(byol_command(run, resume=True), run)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert err.count("\n") == 0 and f"pid {proc.pid}" in err and "in use by another byol process" in err
        assert (run / "metrics.jsonl").read_text().startswith(before)  # the refused one touched nothing
    finally:
        sigkill(proc)
    # the kernel dropped the lock with the process: a resume goes ahead at once
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    resumed = run_byol(byol_command(run, f"train.max_steps={step + 2}", resume=True), run)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped at step {step + 2}" in resumed.stdout


def test_sigterm_finishes_the_step_checkpoints_exits_130_and_resumes_bitwise(tmp_path, reference):
    run = tmp_path / "run"
    proc = start_byol(byol_command(run), run)
    wait_for_step(proc, run, 7)
    proc.send_signal(signal.SIGTERM)  # a preemption notice
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 7 <= stopped["step"] < TOTAL_STEPS and logged_steps(run)[-1] == stopped["step"]
    done = run_byol(byol_command(run, resume=True), run)
    assert done.returncode == 0, done.stderr
    _assert_same_as_reference(run, reference)
