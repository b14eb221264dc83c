"""Training a classifier on labelled images: the linear and fine-tuning protocols of docs/method.md §5.

One loop serves both. ``freeze_encoder=True`` is linear evaluation: the encoder stays in eval
mode (BN uses and keeps its running statistics), runs under ``no_grad`` and only the linear head
on y learns. ``freeze_encoder=False`` is fine-tuning: encoder and head learn end to end, BN in
train mode. Both use SGD (Nesterov momentum 0.9) with a per-step cosine learning rate, random
crop + flip while training and the centre-crop transform at test.

Determinism: the order of each epoch comes from a seeded permutation (``ResumableSampler``) and
the augmentation of image i in epoch e from an RNG seeded by (seed, e, i), as the pretraining
views are (``byol.data.seeded.SeededSamples``), so the result does not depend on the worker count.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from tqdm import tqdm

from byol.data.sampler import ResumableSampler
from byol.data.seeded import SeededSamples
from byol.data.workers import loader
from byol.eval.features import extract_features
from byol.eval.knn import accuracy
from byol.optim.schedules import warmup_cosine_lr
from byol.seeding import seeded


def train_transform(size: int, mean: Sequence[float], std: Sequence[float],
                    crop_scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """Random crop + flip of docs/method.md §5 for training a classifier.

    uint8 ``[3, H, W]`` -> random resized crop (area ~ U[crop_scale], bicubic as the
    pretraining crop) -> horizontal flip (p = 0.5) -> float32 ``[3, size, size]`` normalised.
    """
    if size <= 0:
        raise ValueError(f"train_transform: size must be > 0, got {size!r}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"train_transform: crop_scale must be 0 < min <= max <= 1, got {crop_scale!r}")
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def _check_args(n_train: int, freeze_encoder: bool, epochs: int, batch_size: int, lr: float,
                momentum: float, nesterov: bool, weight_decay: float) -> None:
    checks = [
        (epochs >= 1, "epochs", ">= 1", epochs),
        (batch_size >= (1 if freeze_encoder else 2), "batch_size",
         ">= 1" if freeze_encoder else ">= 2 to fine-tune (BatchNorm)", batch_size),
        (lr > 0, "lr", "> 0", lr),
        (0 <= momentum < 1 and (momentum > 0 or not nesterov), "momentum",
         "in (0, 1) with Nesterov, [0, 1) without", momentum),
        (weight_decay >= 0, "weight_decay", ">= 0", weight_decay),
        # BN in train mode needs two samples to normalise a batch
        (n_train >= (1 if freeze_encoder else 2), "training images",
         ">= 1" if freeze_encoder else ">= 2 to fine-tune (BatchNorm)", n_train),
    ]
    for ok, name, rule, value in checks:
        if not ok:
            raise ValueError(f"train_classifier: {name} must be {rule}, got {value!r}")


def _seeded_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The linear classifier on y [B, D] -> logits [B, C], initialised from ``seed`` alone."""
    with seeded(seed):
        return nn.Linear(feature_dim, num_classes)


def _evaluate(encoder: nn.Module, head: nn.Linear, test_ds: Dataset, batch_size: int,
              device: torch.device, workers: int, progress: bool, desc: str) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of head(encoder(x)) on the test set, BN in eval mode."""
    feats, labels = extract_features(encoder, test_ds, batch_size=batch_size, device=device,
                                     workers=workers, progress=progress, desc=f"{desc} test")
    with torch.no_grad():
        scores = head(feats.to(device)).float().cpu()
    return accuracy(scores, labels, 1), accuracy(scores, labels, 5)


@contextmanager
def _encoder_mode(encoder: nn.Module, freeze: bool):
    """Frozen: no gradients and eval mode (BN normalises with, and never updates, its running
    statistics); fine-tuning: train mode. The caller's mode and requires_grad flags come back after."""
    grad_flags = [p.requires_grad for p in encoder.parameters()]
    was_training = encoder.training
    if freeze:
        encoder.requires_grad_(False)
    encoder.train(not freeze)
    try:
        yield
    finally:
        encoder.train(was_training)
        for p, flag in zip(encoder.parameters(), grad_flags):
            p.requires_grad_(flag)


def _sgd_step(encoder: nn.Module, head: nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, freeze: bool, device: torch.device) -> torch.Tensor:
    """One step of cross-entropy on head(encoder(x)), x [B, 3, H, W], y [B] -> detached loss."""
    # NHWC: the encoder may be in channels_last (train.channels_last); a no-op cost if not
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    with torch.set_grad_enabled(not freeze):
        features = encoder(x)
    loss = F.cross_entropy(head(features.float()), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_classifier(encoder: nn.Module, num_classes: int, train_ds: Dataset, test_ds: Dataset, *,
                     freeze_encoder: bool, epochs: int, batch_size: int, lr: float,
                     momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                     device: torch.device | str = "cpu", workers: int = 0, seed: int = 0,
                     progress: bool = False, desc: str = "classifier") -> dict:
    """Train a linear head on the encoder (frozen or fine-tuned) and score it on ``test_ds``.

    ``train_ds`` and ``test_ds`` yield (float image [3, H, W], label): the training one with a
    random transform (seeded per sample here), the test one deterministic. The batch is clamped
    to the training set size; a last batch of a single image is dropped (BN cannot normalise
    one sample). ``lr`` is the peak of a per-step cosine decay to 0. The encoder is modified in
    place when fine-tuning. Returns {"top1", "top5" (percent), "train_loss" (mean over the last
    epoch), "epochs", "steps", "batch", "lr", "n_train", "n_test", "seconds"}.
    """
    n_train = len(train_ds)
    _check_args(n_train, freeze_encoder, epochs, batch_size, lr, momentum, nesterov, weight_decay)
    device = torch.device(device)
    start = time.perf_counter()
    batch = min(batch_size, n_train)
    drop_last = n_train % batch == 1 and n_train > 1
    steps_per_epoch = n_train // batch if drop_last else math.ceil(n_train / batch)
    total = epochs * steps_per_epoch

    head = _seeded_head(encoder.feature_dim, num_classes, seed).to(device)
    params = list(head.parameters()) + ([] if freeze_encoder else list(encoder.parameters()))
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    sampler = ResumableSampler(n_train, seed)
    data = loader(SeededSamples(train_ds, seed), batch, workers=workers, sampler=sampler,
                  drop_last=drop_last, pin_memory=device.type == "cuda",
                  generator=torch.Generator().manual_seed(seed))
    step, epoch_loss = 0, torch.zeros(())
    with _encoder_mode(encoder, freeze_encoder), tqdm(total=total, desc=desc, disable=not progress,
                                                      leave=False) as bar:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            epoch_loss = torch.zeros((), device=device)
            for x, y in data:
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine_lr(step, total, 0, lr)
                loss = _sgd_step(encoder, head, opt, x, y, freeze_encoder, device)
                epoch_loss += loss
                step += 1
                bar.update(1)
                if progress and step % 10 == 0:  # .item() syncs the device: not every step
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    top1, top5 = _evaluate(encoder, head, test_ds, batch_size, device, workers, progress, desc)
    return {"top1": top1, "top5": top5, "train_loss": epoch_loss.item() / steps_per_epoch,
            "epochs": epochs, "steps": total, "batch": batch, "lr": lr, "n_train": n_train,
            "n_test": len(test_ds), "seconds": time.perf_counter() - start}
