"""TrainBatches yields exactly what the training loop fed the step before it existed: the same
sampler, loader, device views, transfer and memory format, for both augmentation backends and
both semantics (docs/fidelity.md), from the start, mid-epoch and across an epoch boundary, on one
process and as rank 1 of 2."""
from __future__ import annotations

import functools

import pytest
import torch

from byol.config import load_config
from byol.data.pipeline import DeviceViews, TrainBatches
from byol.data.pretrain import build_pretrain_data
from byol.data.sampler import ResumableSampler
from byol.data.workers import loader
from conftest import TINY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.cache
def _setup(backend: str, channels_last: bool = True, semantics: str = "official"):
    # 40 images, global batch 8 -> 5 steps per epoch
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=40", "data.val_fraction=0",
                             f"augment.backend={backend}", f"train.channels_last={channels_last}",
                             f"augment.semantics={semantics}"])
    return cfg, build_pretrain_data(cfg).views


def _walk(batches_of, steps_per_epoch: int, epoch: int, step_in_epoch: int, step: int, stop_at: int):
    """The loop's walk over epochs (as ``_train`` does it), from a resumed position to ``stop_at``:
    ``batches_of(epoch, step_in_epoch, step)`` gives one epoch's batches."""
    out = []
    while step < stop_at:
        if step_in_epoch >= steps_per_epoch:  # never spin on an empty epoch
            epoch, step_in_epoch = epoch + 1, 0
        for v1, v2, labels in batches_of(epoch, step_in_epoch, step):
            out.append((step, v1, v2, labels))
            step, step_in_epoch = step + 1, step_in_epoch + 1
            if step_in_epoch == steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if step >= stop_at:
                break
    return out


def _reference(views, cfg, device, workers, rank, world, start, stop_at):
    """What ``_train`` in train/loop.py built and fed the step before TrainBatches, line for line."""
    batch = cfg.optim.batch_size
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    sampler = ResumableSampler(len(views), seed=cfg.train.seed, rank=rank, world_size=world, batch_size=batch)
    device_views = DeviceViews(cfg.augment, cfg.train.seed) if cfg.augment.backend == "batched" else None
    dl = loader(views, batch // world, workers=workers, sampler=sampler, drop_last=True,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed),
                persistent=True)

    def batches_of(epoch, step_in_epoch, step):
        sampler.set_epoch(epoch, start=step_in_epoch * batch)
        for v1, v2, labels in dl:
            v1, v2 = (v.to(device, non_blocking=True) for v in (v1, v2))
            if device_views is not None:
                v1, v2 = device_views(v1, v2, step, rank)
            v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))
            yield v1, v2, labels
            step += 1  # the loop's state.step, read again at the next batch

    return _walk(batches_of, len(views) // batch, *start, stop_at)


def _pipeline(views, cfg, device, workers, rank, world, start, stop_at):
    batches = TrainBatches(views, cfg, device, workers, rank=rank, world=world)
    assert batches.steps_per_epoch == len(views) // cfg.optim.batch_size
    return _walk(lambda e, k, s: batches.epoch(e, step_in_epoch=k, step=s), batches.steps_per_epoch,
                 *start, stop_at)


def _assert_same(expected, got, memory_format):
    assert len(got) == len(expected) > 0
    for (s_a, a1, a2, la), (s_b, b1, b2, lb) in zip(expected, got):
        assert s_a == s_b
        for a, b in ((a1, b1), (a2, b2)):
            assert a.dtype == b.dtype == torch.float32 and a.device == b.device
            assert b.is_contiguous(memory_format=memory_format)
            assert torch.equal(a, b)
        assert torch.equal(la, lb) and lb.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantics", ["official", "torchvision"])
@pytest.mark.parametrize("backend", ["reference", "batched"])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
@pytest.mark.parametrize("start", [(0, 0, 0), (0, 3, 3), (1, 0, 5)], ids=["start", "mid_epoch", "at_boundary"])
def test_batches_are_the_ones_the_loop_fed_the_step(device, semantics, backend, rank, world, start):
    cfg, views = _setup(backend, semantics=semantics)
    device = torch.device(device)
    stop_at = 8 if start[2] < 5 else 12  # every case crosses one epoch boundary (5 steps an epoch)
    torch.manual_seed(1)
    expected = _reference(views, cfg, device, 0, rank, world, start, stop_at)
    rng_expected = torch.get_rng_state()
    torch.manual_seed(1)
    got = _pipeline(views, cfg, device, 0, rank, world, start, stop_at)
    assert torch.equal(torch.get_rng_state(), rng_expected)  # the global stream advances as before
    _assert_same(expected, got, torch.channels_last)
    assert got[0][1].shape == (cfg.optim.batch_size // world, 3, 16, 16)
    assert [s for s, *_ in got] == list(range(start[2], stop_at))


def test_contiguous_memory_format_and_persistent_workers():
    cfg, views = _setup("batched", channels_last=False)
    device = torch.device("cpu")
    expected = _reference(views, cfg, device, 2, 0, 1, (0, 3, 3), 8)
    got = _pipeline(views, cfg, device, 2, 0, 1, (0, 3, 3), 8)
    _assert_same(expected, got, torch.contiguous_format)


@pytest.mark.parametrize("semantics,dtype", [("official", torch.float32), ("torchvision", torch.uint8)])
def test_the_workers_hand_the_device_crops_of_the_semantics(semantics, dtype):
    """augment.backend=batched: the loader's crops are uint8 in torchvision semantics and float32 in
    [0, 1] in official semantics (the release's resize is float, clipped after the /255); the
    reference backend's views are normalised floats in both."""
    cfg, views = _setup("batched", semantics=semantics)
    v1, v2, _ = views[(0, 3)]
    assert v1.dtype == v2.dtype == dtype and v1.shape == (3, 16, 16)
    if semantics == "official":
        assert 0 <= v1.min() and v1.max() <= 1 and not torch.equal(v1, (v1 * 255).round() / 255)  # not 8-bit
    batch = next(iter(TrainBatches(views, cfg, torch.device("cpu"), 0).epoch(0)))
    assert batch[0].dtype == batch[1].dtype == torch.float32 and batch[0].min() < 0  # normalised
    cfg, views = _setup("reference", semantics=semantics)
    assert views[(0, 3)][0].dtype == torch.float32


def test_the_batched_backend_draws_the_device_views_of_each_global_step():
    """Batch k of an epoch started at global step s gets the device views of step s + k; the
    same batch at another step gets other views."""
    cfg, views = _setup("batched")
    batches = TrainBatches(views, cfg, torch.device("cpu"), 0)
    a = next(iter(batches.epoch(0, step_in_epoch=1, step=1)))
    b = next(iter(batches.epoch(0, step_in_epoch=1, step=2)))
    assert torch.equal(a[2], b[2]) and not torch.equal(a[0], b[0])
