"""Fast linear evaluation on cached frozen features (docs/method.md §5, linear evaluation).

The paper trains the linear classifier on augmented crops through the frozen encoder (80
epochs). Here the features of centre crops are extracted once (``byol.eval.cache``) and a
multinomial logistic regression is fitted on them: an lr x weight-decay sweep on a per-class
validation part of the training split, the best setting refitted on train + val, then tested.
Minutes become seconds, at the cost of the crop/flip augmentation of the classifier's inputs.
Measured on a shared 2-core CPU (random tensors: 40.5k train + 4.5k val features of 512 dims,
10 classes, 12 settings x 100 epochs, then the refit on all 45k): 20 s on one thread, 15 s on two.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from byol.config import Config, config_to_dict
from byol.data.errors import DataError
from byol.data.folder import split_per_class
from byol.data.sources import Transformed
from byol.data.transforms import make_eval_transform
from byol.data.workers import default_workers
from byol.eval.cache import Features, cached_features
from byol.eval.commands import LoadedRun, eval_encoder, load_checkpoint_run, write_result
from byol.eval.data import EvalSplits, eval_splits, fingerprint, sample_labels
from byol.eval.knn import accuracy
from byol.eval.probe import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    check_sweep,
    fit_linear,
)
from byol.train.runtime import resolve_device


def _identity(run: LoadedRun, random_init: bool, seed: int) -> dict:
    """What identifies the encoder's weights in the feature-cache key: the checkpoint's bytes,
    or for the random-init floor the architecture and the init seed."""
    if not random_init:
        return {"checkpoint_sha256": run.digest}
    return {"random_init": True, "seed": seed, "model": config_to_dict(run.cfg)["model"]}


def _check_command_args(val_fraction: float, seed: int, workers: int | None) -> None:
    """DataError (one line, naming the CLI flag) before anything slow runs."""
    if not 0 < val_fraction < 1:
        raise DataError(f"eval linear: --val-fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"eval linear: --seed must be >= 0, got {seed}")
    if workers is not None and workers < 0:
        raise DataError(f"eval linear: --workers must be >= 0, got {workers}")


def _frozen_features(encoder: nn.Module, identity: dict, cfg: Config, splits: EvalSplits, *,
                     cache_dir: Path | None, device: torch.device, workers: int) -> dict[str, Features]:
    """Centre-crop features of the train and test splits, cached under the encoder's
    identity, the images' fingerprint and the transform."""
    tf = make_eval_transform(cfg.augment)
    return {name: cached_features(encoder, Transformed(ds, tf), cache_dir=cache_dir,
                                  key_parts={**identity, "data": fingerprint(ds), "transform": repr(tf)},
                                  batch_size=cfg.eval.batch_size, device=device, workers=workers,
                                  progress=True, desc=f"{name} features")
            for name, ds in (("train", splits.train), ("test", splits.test))}


def fast_linear_command(run: str, *, train: str | None = None, test: str | None = None,
                        val_fraction: float = 0.1, lrs=None, weight_decays=None,
                        epochs: int | None = None, batch_size: int | None = None,
                        device: str = "auto", workers: int | None = None, random_init: bool = False,
                        seed: int = 0, cache: bool = True) -> dict:
    """Fast linear evaluation (docs/method.md §5) of a run's online encoder, or with ``random_init``
    of a fresh encoder of the same architecture (the floor), on the run's held-out split or on
    ``train`` / ``test`` folders. ``batch_size`` is the classifier's mini-batch; features are
    extracted with ``eval.batch_size`` and cached (``cache=False``: neither read nor written).

    Returns top1 / top5 (percent), the chosen lr / weight decay, the sweep, sizes and timing;
    with a run directory also writes run_dir/eval/linear_fast_<tag>[_random_init].json.
    """
    start = time.perf_counter()
    lrs = DEFAULT_LRS if lrs is None else tuple(lrs)
    weight_decays = DEFAULT_WEIGHT_DECAYS if weight_decays is None else tuple(weight_decays)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    check_sweep(lrs, weight_decays, epochs, batch_size)
    _check_command_args(val_fraction, seed, workers)
    loaded = load_checkpoint_run(run)
    cfg, ckpt, run_dir = loaded.cfg, loaded.checkpoint, loaded.run_dir
    dev = resolve_device(device, what="--device")
    splits = eval_splits(cfg, train, test, what="eval linear", n_train=loaded.n_train)
    fit_idx, val_idx = split_per_class(sample_labels(splits.train), val_fraction, seed)
    if not val_idx or not fit_idx:
        raise DataError(f"eval linear: {splits.train_source} is too small to hold out a "
                        f"validation part (--val-fraction {val_fraction}); need >= 2 images per class")
    encoder, identity = eval_encoder(loaded, random_init, seed, dev), _identity(loaded, random_init, seed)
    cache_dir = None if not cache else (run_dir / "eval" if run_dir else ckpt.parent) / "feature_cache"
    feats = _frozen_features(encoder, identity, cfg, splits, cache_dir=cache_dir, device=dev,
                             workers=default_workers(workers, dev))
    x, y = feats["train"].features, feats["train"].labels
    fit_idx, val_idx = torch.tensor(fit_idx), torch.tensor(val_idx)
    probe, chosen = fit_linear(x[fit_idx], y[fit_idx], x[val_idx], y[val_idx],
                               num_classes=splits.num_classes, lrs=lrs, weight_decays=weight_decays,
                               epochs=epochs, batch_size=batch_size, seed=seed, device=dev)
    with torch.no_grad():
        scores = probe(feats["test"].features)
    test_y = feats["test"].labels
    out = {"top1": accuracy(scores, test_y, 1), "top5": accuracy(scores, test_y, 5), **chosen,
           "epochs": epochs, "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed,
           "random_init": random_init, "n_train": len(fit_idx), "n_val": len(val_idx),
           "n_refit": len(fit_idx) + len(val_idx),
           "n_test": len(test_y), "num_classes": splits.num_classes, "feature_dim": x.shape[1],
           "checkpoint": str(ckpt), "step": loaded.step, "train": splits.train_source, "test": splits.test_source,
           "cache_hits": {name: f.hit for name, f in feats.items()},
           "seconds": time.perf_counter() - start}
    return write_result(loaded, f"linear_fast_{splits.tag}", out, random_init)
