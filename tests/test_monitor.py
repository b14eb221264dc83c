"""Monitors during pretraining: collapse diagnostics, the online linear classifier, held-out kNN.

They must watch without touching: a run with every monitor on trains the same encoder, bitwise,
as a run with them off.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from byol.config import load_config
from byol.eval.diagnostics import CollapseDetector, OnlineLinear, collapse_stats, effective_rank
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY


def _cfg(tmp_path, name, *extra):
    # 64 shapes, 16 held out -> 48 train, batch 8: 6 steps per epoch
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=64",
                              "data.val_fraction=0.25", f"train.out_dir={tmp_path}",
                              f"train.name={name}", *extra])


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- effective rank and the normalised std: analytic values ------------------------------------
def test_effective_rank_reference_values():
    same = torch.ones(32, 8)  # every sample the same vector: one singular value
    assert effective_rank(same).item() == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.eye(8)).item() == pytest.approx(8.0, rel=1e-4)  # equal singular values
    # singular values (3, 1): p = (3/4, 1/4), rank = exp(H(p))
    x = torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(x).item() == pytest.approx(math.exp(h), rel=1e-4)
    # invariant to rotations and to scale
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    y = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    assert effective_rank(3 * y @ q).item() == pytest.approx(effective_rank(y).item(), rel=1e-4)


def test_collapse_stats_healthy_vs_collapsed():
    g = torch.Generator().manual_seed(0)
    spread = collapse_stats(torch.randn(256, 32, generator=g), torch.randn(256, 16, generator=g))
    point = torch.randn(1, 16, generator=g).expand(256, 16)  # every image maps to one point
    collapsed = collapse_stats(torch.randn(256, 32, generator=g), point + 1e-6 * torch.randn(256, 16, generator=g))
    assert spread["z_std"].item() == pytest.approx(1.0, abs=0.1)  # isotropic Gaussian: ~1
    assert collapsed["z_std"].item() < 1e-3 and collapsed["z_rank"].item() < 1.1
    assert spread["z_rank"].item() > 12 and spread["y_rank"].item() > 25


def test_collapse_detector_needs_consecutive_readings_and_keeps_first_step():
    det = CollapseDetector(0.1)  # patience 2
    assert not det.update(10, 0.8) and det.collapsed_at is None
    assert not det.update(20, 0.05) and det.collapsed_at is None  # one noisy reading
    assert not det.update(30, 0.5)
    assert not det.update(40, 0.05) and det.update(50, 0.04) and det.collapsed_at == 50
    assert not det.update(60, 0.5) and det.collapsed_at == 50  # the first collapse stays on record
    assert CollapseDetector(0.1, collapsed_at=7).collapsed_at == 7  # restored from a checkpoint
    with pytest.raises(ValueError, match="collapse_threshold"):
        CollapseDetector(1.5)


def test_online_linear_learns_and_sends_no_gradient():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 10, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    encoder = torch.nn.Linear(10, 10)
    x = centres[labels] + torch.randn(300, 10, generator=g)
    y = encoder(x)  # requires grad: the probe must detach it
    probe = OnlineLinear(10, 3, lr=0.05)
    for _ in range(60):
        probe.train_step(y, labels)
    probe.take_accuracy()  # the running count restarts here
    probe.train_step(y, labels)
    assert probe.take_accuracy() > 90 and probe.take_accuracy() is None
    assert encoder.weight.grad is None and encoder.bias.grad is None
    # unlabelled rows (-1) are ignored: no count, a zero loss (Adam's momentum still moves), no NaN
    probe.train_step(y, torch.full((300,), -1))
    assert probe.take_accuracy() is None and torch.isfinite(probe.fc.weight).all()
    # the probe's init draws from its own generator: the global RNG stream is untouched
    state = torch.get_rng_state()
    OnlineLinear(10, 3, seed=5)
    assert torch.equal(state, torch.get_rng_state())


# -- in the loop ---------------------------------------------------------------------------------
def test_monitors_never_change_the_encoder(tmp_path):
    """Same seed with every monitor on (online classifier, kNN every epoch, ranks every step) and
    with all of them off: bitwise the same encoder, heads and target, and the same losses."""
    on = pretrain(_cfg(tmp_path, "on", "optim.epochs=3", "eval.online_linear=true", "eval.knn_every=1",
                       "eval.collapse_every=1"))
    off = pretrain(_cfg(tmp_path, "off", "optim.epochs=3", "eval.online_linear=false", "eval.knn_every=0",
                        "eval.collapse_every=1000"))
    a = load_checkpoint(find_checkpoint(on.run_dir))
    b = load_checkpoint(find_checkpoint(off.run_dir))
    assert "probe" in a and "probe" not in b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows_on, rows_off = _rows(on.run_dir), _rows(off.run_dir)
    assert [r["loss"] for r in rows_on if "loss" in r] == [r["loss"] for r in rows_off if "loss" in r]
    # the monitors did run: ranks each step, kNN after epochs 1 and 2 (epoch 3 is the final eval)
    train_on = [r for r in rows_on if "loss" in r]
    assert all("z_rank" in r and "y_rank" in r and "online_linear_top1" in r for r in train_on)
    val = [r for r in rows_on if "val_knn_top1" in r]
    assert [r["step"] for r in val] == [6, 12, 18] and all("val_online_linear_top1" in r for r in val)
    assert not any("online_linear_top1" in r for r in rows_off)
    assert on.knn == off.knn  # same encoder -> same final kNN
    assert (on.run_dir / "eval" / "online_linear.json").is_file()


def test_forced_collapse_is_flagged_and_a_healthy_run_is_not(tmp_path, capsys):
    """No predictor and tau = 0 (the target is the online network itself): the trivial constant
    solution is reachable and the projections collapse; BYOL with its predictor does not."""
    collapse = ["method.predictor=false", "method.tau_base=0.0", "method.tau_schedule=constant",
                "optim.name=sgd", "optim.base_lr=20.0", "optim.epochs=6", "eval.collapse_every=6"]
    bad = pretrain(_cfg(tmp_path, "collapse", *collapse))
    rows = [r for r in _rows(bad.run_dir) if "loss" in r]
    assert bad.collapsed_at is not None and rows[-1]["collapsed"] == 1
    ranked = [r for r in rows if "z_rank" in r]
    assert rows[-1]["z_std"] < 0.06 and ranked[-1]["z_rank"] < ranked[0]["z_rank"]
    summary = json.loads((bad.run_dir / "summary.json").read_text())
    assert summary["collapsed"] is True and summary["collapsed_at_step"] == bad.collapsed_at
    assert "projections have collapsed" in capsys.readouterr().err

    good = pretrain(_cfg(tmp_path, "healthy", "optim.epochs=6", "eval.collapse_every=6"))
    rows = [r for r in _rows(good.run_dir) if "loss" in r]
    assert good.collapsed_at is None and not any(r["collapsed"] for r in rows)
    assert min(r["z_std"] for r in rows) > 0.2
    assert json.loads((good.run_dir / "summary.json").read_text())["collapsed"] is False


def test_monitors_resume_without_losing_or_repeating_rows(tmp_path):
    """Stop at an epoch end (its kNN row is written before the checkpoint) and resume: every
    held-out row appears once, with the uninterrupted run's numbers; resuming the finished run
    again does not repeat the final evaluation."""
    extra = ["optim.epochs=3", "eval.knn_every=1", "train.log_every=4"]
    full = pretrain(_cfg(tmp_path, "full", *extra))
    part = pretrain(_cfg(tmp_path, "split", *extra, "train.max_steps=6"))
    done = pretrain(_cfg(tmp_path, "split", *extra), resume=part.run_dir)
    val = lambda run: [(r["step"], r["val_knn_top1"], r["val_online_linear_top1"])  # noqa: E731
                       for r in _rows(run) if "val_knn_top1" in r]
    assert val(full.run_dir) == val(done.run_dir) and [s for s, *_ in val(full.run_dir)] == [6, 12, 18]
    again = pretrain(_cfg(tmp_path, "split", *extra), resume=done.run_dir)
    assert again.knn is None and val(again.run_dir) == val(full.run_dir)
