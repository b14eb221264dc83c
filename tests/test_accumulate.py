"""Gradient accumulation (optim.accumulate_steps=N): the batch split into N micro-batches, one
optimizer step, one EMA and one queue append per N of them (train/step.py, docs/method.md §4)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

from byol import BYOL, LARS, param_groups
from byol.config import ConfigError, load_config
from byol.losses import InfoNCELoss
from byol.models import MLPHead, NegativeQueue
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import _check_micro_batches, pretrain
from byol.train.setup import build_model_and_optimizer
from byol.train.step import train_step
from conftest import TINY

NO_BATCH_STATS = ["model.backbone_norm=gn_ws", "model.head_norm=ln"]  # every output row its own


def _cfg(tmp_path, name, *extra):
    # 48 images, batch 8 -> 6 steps per epoch, 2 epochs = 12 steps
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0",
                              f"train.out_dir={tmp_path}", f"train.name={name}", "train.checkpoint_every=100",
                              *extra])


def _views(batch: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def _built(*overrides):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    return build_model_and_optimizer(cfg, torch.device("cpu"))


def _two_steps(model, opt, n: int, **kw):
    v1, v2 = _views()
    train_step(model, opt, v1, v2, lr=0.5, tau=0.9, accumulate_steps=n, **kw)
    return train_step(model, opt, v2, v1, lr=0.5, tau=0.9, accumulate_steps=n, **kw)


def _assert_same_training(a: nn.Module, opt_a, b: nn.Module, opt_b) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):  # online, target, queue
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=k)
    for s_a, s_b in zip(opt_a.state.values(), opt_b.state.values()):  # LARS momentum
        torch.testing.assert_close(s_b["momentum_buffer"], s_a["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_four_micro_batches_step_like_the_whole_batch_without_batch_statistics():
    """(a) Without batch statistics the gradient of the mean of 4 micro-batch losses is the
    batch's: one step moves the online and target weights and the LARS state as N=1 does, to
    float tolerance."""
    ref, ref_opt = _built(*NO_BATCH_STATS)
    acc, acc_opt = _built(*NO_BATCH_STATS)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    # one step: this small ResNet at lr 0.5 amplifies float rounding (1e-7) a hundredfold per step
    stats_ref, out_ref = train_step(ref, ref_opt, *_views(), lr=0.5, tau=0.9)
    stats_acc, out_acc = train_step(acc, acc_opt, *_views(), lr=0.5, tau=0.9, accumulate_steps=4)
    assert any(not torch.equal(v, start[k]) for k, v in acc.state_dict().items() if k.startswith("target_"))
    _assert_same_training(ref, ref_opt, acc, acc_opt)
    # the step's stats and the monitors' outputs are the whole batch's
    assert out_acc.representation.shape == out_ref.representation.shape == (8, ref.feature_dim)
    torch.testing.assert_close(out_acc.projection, out_ref.projection, rtol=1e-5, atol=1e-6)
    for k in ("loss", "z_std"):
        torch.testing.assert_close(stats_acc[k], stats_ref[k], rtol=1e-5, atol=1e-6)


def _moco() -> BYOL:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())
    return BYOL(encoder, 16, projector=MLPHead(16, 32, 8, "none"), predictor=nn.Identity(),
                loss=InfoNCELoss(alpha=0.5, beta=1.0), queue=NegativeQueue(24, 8))


def test_moco_queue_gets_every_micro_batch_keys_once_per_step():
    """The queue is appended once per step, with all micro-batches' keys in batch order, and every
    micro-batch reads the keys of earlier steps: the same queue and weights as N=1."""
    ref, acc = _moco(), _moco()
    ref_opt, acc_opt = (LARS(param_groups(m, weight_decay=1e-4), lr=0.0) for m in (ref, acc))
    v1, v2 = (v[:, :, :4, :4].contiguous() for v in _views())
    for model, opt, n in ((ref, ref_opt, 1), (acc, acc_opt, 2)):
        train_step(model, opt, v1, v2, lr=0.5, tau=0.9, accumulate_steps=n)
        train_step(model, opt, v2, v1, lr=0.5, tau=0.9, accumulate_steps=n)  # negatives: step 1's keys
    assert int(acc.queue.count) == 24 and int(acc.queue.ptr) == 32 % 24
    _assert_same_training(ref, ref_opt, acc, acc_opt)


def test_a_non_finite_micro_batch_drops_the_whole_step():
    """train.nonfinite=skip reads the accumulated gradients: a NaN in the last micro-batch undoes
    the earlier ones too (weights, target, batch-norm statistics, optimizer state)."""
    model, opt = _built()
    train_step(model, opt, *_views(), lr=0.5, tau=0.9, accumulate_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]
    v1, v2 = _views()
    v1[6:] = float("nan")  # the second micro-batch only
    stats, _ = train_step(model, opt, v1, v2, lr=0.5, tau=0.9, skip_nonfinite=True, accumulate_steps=2)
    assert float(stats["skipped"]) == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, opt.state.values()))
    stats, _ = train_step(model, opt, *_views(), lr=0.5, tau=0.9, skip_nonfinite=True, accumulate_steps=2)
    assert float(stats["skipped"]) == 0.0


def test_batch_norm_statistics_are_per_micro_batch():
    """(e) With batch norm the micro-batches normalise with their own statistics: it trains,
    and differently from N=1."""
    ref, ref_opt = _built()
    acc, acc_opt = _built()
    _two_steps(ref, ref_opt, 1)
    stats, _ = _two_steps(acc, acc_opt, 2)
    assert torch.isfinite(stats["loss"])
    online = [k for k in ref.state_dict() if k.startswith("encoder.") and ref.state_dict()[k].is_floating_point()]
    assert any(not torch.equal(ref.state_dict()[k], acc.state_dict()[k]) for k in online)


class _SpyDDP(nn.Module):
    """DDP's interface as train_step uses it: ``module`` and ``no_sync``; records, per forward,
    whether the gradient all-reduce was suppressed."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.synced, self._quiet = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def forward(self, v1, v2):
        self.synced.append(not self._quiet)
        return self.module(v1, v2)


@pytest.mark.parametrize("n", [1, 4])
def test_ddp_all_reduces_on_the_last_micro_batch_only(n):
    """(f) ``no_sync`` around every micro-batch but the last (whose backward all-reduces)."""
    model, opt = _built(*NO_BATCH_STATS)
    spy = _SpyDDP(model)
    train_step(spy, opt, *_views(), lr=0.5, tau=0.9, accumulate_steps=n)
    assert spy.synced == [False] * (n - 1) + [True]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedules_count_optimizer_steps_and_resume_is_exact(tmp_path):
    """(b) N=2 at batch 8 has the steps, lr and tau of N=1 at batch 8; (c) a stop inside an epoch
    and a resume continue bitwise (checkpoints exist only between optimizer steps)."""
    one = pretrain(_cfg(tmp_path, "one", "train.max_steps=8"))
    full = pretrain(_cfg(tmp_path, "full", "optim.accumulate_steps=2", "train.max_steps=8"))
    part = pretrain(_cfg(tmp_path, "split", "optim.accumulate_steps=2", "train.max_steps=3"))
    assert part.step == 3
    done = pretrain(_cfg(tmp_path, "split", "optim.accumulate_steps=2", "train.max_steps=8"), resume=part.run_dir)
    assert full.step == done.step == one.step == 8

    ref, rows = _rows(one.run_dir), _rows(full.run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 9))
    assert [(r["lr"], r["tau"], r["epoch"]) for r in rows] == [(r["lr"], r["tau"], r["epoch"]) for r in ref]
    assert [r["loss"] for r in _rows(done.run_dir)] == [r["loss"] for r in rows]

    sd_a, sd_b = (load_checkpoint(find_checkpoint(r.run_dir)) for r in (full, done))
    assert (sd_a["epoch"], sd_a["step_in_epoch"]) == (1, 2)
    for k, v in sd_a["model"].items():  # bitwise: same data order, same micro-batches, same arithmetic
        assert torch.equal(v, sd_b["model"][k]), k
    for s_a, s_b in zip(sd_a["optimizer"]["state"].values(), sd_b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    for k, v in sd_a["probe"]["module"].items():
        assert torch.equal(v, sd_b["probe"]["module"][k]), k


def test_a_batch_that_does_not_split_is_a_config_error():
    """(d) One line naming the keys, from the config (global batch) or at start (per process)."""
    with pytest.raises(ConfigError, match=r"optim.batch_size must be a multiple of optim.accumulate_steps=3"):
        load_config(None, [*TINY, "optim.accumulate_steps=3"])
    with pytest.raises(ConfigError, match="optim.accumulate_steps must be >= 1"):
        load_config(None, [*TINY, "optim.accumulate_steps=0"])
    cfg = load_config(None, [*TINY, "optim.batch_size=12", "optim.accumulate_steps=4"])
    _check_micro_batches(cfg, 1)
    with pytest.raises(ConfigError, match=r"6 per process, not a multiple of optim.accumulate_steps=4") as info:
        _check_micro_batches(cfg, 2)
    assert "\n" not in str(info.value) and "optim.batch_size=12" in str(info.value)
    cfg = load_config(None, [*TINY, "optim.batch_size=8", "optim.accumulate_steps=8"])
    with pytest.raises(ConfigError, match="1 image each: batch norm needs two"):
        _check_micro_batches(cfg, 1)
    _check_micro_batches(load_config(None, [*TINY, *NO_BATCH_STATS, "optim.accumulate_steps=8"]), 1)
