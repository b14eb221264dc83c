"""Evaluation commands on a run directory or checkpoint (the `byol eval ...` CLI)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from byol.config import Config, config_from_dict
from byol.config.loading import saved_run_config
from byol.data.errors import DataError
from byol.data.sources import Transformed
from byol.data.transforms import make_eval_transform
from byol.data.workers import default_workers
from byol.eval.data import eval_splits
from byol.eval.knn import evaluate_knn
from byol.models.build import build_encoder, build_model
from byol.seeding import seeded
from byol.train.checkpoint import LAST, find_checkpoint, load_checkpoint, load_newest
from byol.train.rundir import write_json
from byol.train.runtime import resolve_device


class LoadedRun(NamedTuple):
    """A pretraining checkpoint, loaded: the config it ran with and the BYOL model."""

    cfg: Config
    model: torch.nn.Module
    checkpoint: Path
    run_dir: Path | None  # None for a checkpoint outside a run directory
    step: int
    n_train: int | None  # images the run trained on (checks the held-out split is still the same)
    digest: str  # sha256 of the checkpoint file: what the feature cache keys on

    @property
    def result_suffix(self) -> str:
        """"" for checkpoints/last.pt, "_<stem>" for any other (epoch_0050.pt -> "_epoch_0050"):
        the results of several checkpoints of one run go to different files."""
        return "" if self.checkpoint.name == LAST else f"_{self.checkpoint.stem}"


def load_checkpoint_run(run_or_checkpoint: str | Path) -> LoadedRun:
    """A run directory (its checkpoints/last.pt) or a checkpoint file -> LoadedRun; a LoadedRun
    (an exported or imported encoder, ``byol.export.export_as_run``) is returned as it is."""
    if isinstance(run_or_checkpoint, LoadedRun):
        return run_or_checkpoint
    ckpt = find_checkpoint(run_or_checkpoint)
    # one read: the hash is of exactly the bytes loaded, even if a run still training replaces
    # last.pt meanwhile (features of old weights must never be cached under a new file's hash)
    raw = ckpt.read_bytes()
    try:
        sd = load_checkpoint(ckpt, raw)
    except DataError:
        if Path(run_or_checkpoint).is_file():
            raise
        ckpt = load_newest(run_or_checkpoint).path  # a run's last.pt is damaged: its newest good one
        print(f"byol: warning: {find_checkpoint(run_or_checkpoint)} does not load; using {ckpt}",
              file=sys.stderr, flush=True)
        raw = ckpt.read_bytes()
        sd = load_checkpoint(ckpt, raw)
    digest = hashlib.sha256(raw).hexdigest()
    del raw
    if "config" not in sd.get("extra", {}):
        raise DataError(f"{ckpt} is not a byol pretraining checkpoint")
    cfg = config_from_dict(saved_run_config(sd["extra"]["config"]))
    model = build_model(cfg)
    model.load_state_dict(sd["model"])
    run_dir = ckpt.parent.parent if (ckpt.parent.parent / "config.yaml").is_file() else None
    return LoadedRun(cfg, model, ckpt, run_dir, int(sd["step"]), sd["extra"].get("n_train"), digest)


def eval_encoder(run: LoadedRun, random_init: bool, seed: int, device: torch.device) -> torch.nn.Module:
    """The run's online encoder f, or (``random_init``) an untrained one of the same architecture
    drawn from ``seed`` alone (the floor), on ``device`` in the run's memory format."""
    if random_init:
        with seeded(seed):  # the CPU generator only; the caller's is untouched
            encoder = build_encoder(run.cfg)
    else:
        encoder = run.model.encoder
    fmt = torch.channels_last if run.cfg.train.channels_last else torch.contiguous_format
    return encoder.to(device, memory_format=fmt)


def write_result(run: LoadedRun, name: str, out: dict, random_init: bool = False) -> dict:
    """Write ``out`` to RUN_DIR/eval/<name>[_<checkpoint>][_random_init].json (when the
    checkpoint is in a run directory) and note the path in ``out["written_to"]``."""
    if run.run_dir is not None:
        path = run.run_dir / "eval" / f"{name}{run.result_suffix}{'_random_init' if random_init else ''}.json"
        write_json(path, out)
        out["written_to"] = str(path)
    return out


def knn_command(run: str, *, train: str | None = None, test: str | None = None, k: int | None = None,
                temperature: float | None = None, batch_size: int | None = None,
                device: str = "auto", workers: int | None = None, random_init: bool = False,
                seed: int = 0) -> dict:
    """Weighted kNN of the run's online encoder on folders (or the run's own held-out split)."""
    loaded = load_checkpoint_run(run)
    cfg = loaded.cfg
    dev = resolve_device(device, what="--device")
    k = cfg.eval.knn_k if k is None else k
    temperature = cfg.eval.knn_temperature if temperature is None else temperature
    batch_size = cfg.eval.batch_size if batch_size is None else batch_size
    if k < 1 or not temperature > 0 or batch_size < 1:
        raise DataError(f"eval knn: need --k >= 1, --temperature > 0 and --batch-size >= 1, got "
                        f"k={k}, T={temperature}, batch {batch_size}")
    splits = eval_splits(cfg, train, test, what="eval knn", n_train=loaded.n_train)
    tf = make_eval_transform(cfg.augment)
    out = evaluate_knn(
        eval_encoder(loaded, random_init, seed, dev), Transformed(splits.train, tf),
        Transformed(splits.test, tf), num_classes=splits.num_classes, k=k, temperature=temperature,
        batch_size=batch_size, device=dev, workers=default_workers(workers, dev), progress=True,
    )
    out.update(checkpoint=str(loaded.checkpoint), step=loaded.step, train=splits.train_source,
               test=splits.test_source, random_init=random_init)
    return write_result(loaded, f"knn_{splits.tag}", out, random_init)
