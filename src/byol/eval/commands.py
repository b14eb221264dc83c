"""Evaluation commands on a run directory or checkpoint (the `byol eval ...` CLI)."""
from __future__ import annotations

from pathlib import Path

import torch

from byol.config import Config, config_from_dict
from byol.data.errors import DataError
from byol.data.loader import Transformed, default_workers, make_eval_transform
from byol.eval.data import eval_splits
from byol.eval.knn import evaluate_knn
from byol.models.build import build_model
from byol.train.loop import resolve_device
from byol.train.run import write_json
from byol.train.state import find_checkpoint, load_checkpoint


def load_run(run_or_checkpoint: str | Path) -> tuple[Config, torch.nn.Module, Path, Path | None]:
    """-> (config, BYOL model with the checkpoint's weights, checkpoint path, run dir or None)."""
    ckpt = find_checkpoint(run_or_checkpoint)
    sd = load_checkpoint(ckpt)
    if "config" not in sd.get("extra", {}):
        raise DataError(f"{ckpt} is not a byol pretraining checkpoint")
    cfg = config_from_dict(sd["extra"]["config"])
    model = build_model(cfg)
    model.load_state_dict(sd["model"])
    run_dir = ckpt.parent.parent if (ckpt.parent.parent / "config.yaml").is_file() else None
    return cfg, model, ckpt, run_dir


def knn_command(run: str, *, train: str | None = None, test: str | None = None, k: int | None = None,
                temperature: float | None = None, batch_size: int | None = None,
                device: str = "auto", workers: int | None = None) -> dict:
    """Weighted kNN of the run's online encoder on folders (or the run's own held-out split)."""
    cfg, model, ckpt, run_dir = load_run(run)
    dev = resolve_device(device, what="--device")
    k = cfg.eval.knn_k if k is None else k
    temperature = cfg.eval.knn_temperature if temperature is None else temperature
    if k < 1 or not temperature > 0:
        raise DataError(f"eval knn: need --k >= 1 and --temperature > 0, got k={k}, T={temperature}")
    splits = eval_splits(cfg, train, test, what="eval knn")
    tf = make_eval_transform(cfg.augment)
    bank, queries = Transformed(splits.train, tf), Transformed(splits.test, tf)
    num_classes, tag = splits.num_classes, f"knn_{splits.tag}"
    out = evaluate_knn(
        model.encoder.to(dev), bank, queries, num_classes=num_classes, k=k, temperature=temperature,
        batch_size=batch_size or cfg.eval.batch_size, device=dev,
        workers=default_workers(workers, dev), progress=True,
    )
    out.update(checkpoint=str(ckpt), train=train, test=test)
    if run_dir is not None:
        path = run_dir / "eval" / f"{tag}.json"
        write_json(path, out)
        out["written_to"] = str(path)
    return out
