"""Checkpoint benchmark: what sealing, rotation and verification cost over a plain torch.save.

    python benchmarks/checkpoint.py --rounds 5 --backbone resnet50

The state is a whole BYOL training state (online + target networks, LARS momentum after one
step, RNG states) as the loop saves it. Each round times, alternating:

- ``plain save``: ``torch.save`` to a temp file, fsync, rename (what a save cost before);
- ``sealed save``: ``save_checkpoint`` (content digest, temp file, fsync, rotation of last.pt to
  previous.pt, rename, fsync of the folder);
- ``plain load``: ``torch.load(weights_only=True)``;
- ``verified load``: ``load_checkpoint`` (the load plus the digest check).

Prints one JSON line per round and the median ratios sealed/plain.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from byol.models.backbones import resnet
from byol.models.byol import BYOL
from byol.optim import LARS, param_groups
from byol.train.checkpoint import load_checkpoint, save_checkpoint
from byol.train.state import TrainState


def _state(backbone: str) -> dict:
    torch.manual_seed(0)
    encoder = resnet(backbone)
    model = BYOL(encoder, feature_dim=encoder.feature_dim)
    opt = LARS(param_groups(model, weight_decay=1.5e-6), lr=0.1)
    x = torch.rand(4, 3, 64, 64)
    loss = model(x, x.flip(-1)).loss
    loss.backward()
    opt.step()  # momentum buffers exist, as in any checkpoint after step 1
    return TrainState(model, opt, step=1).state_dict()


def _plain_save(sd: dict, folder: Path) -> None:
    tmp = folder / ".plain.tmp"
    with open(tmp, "wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "plain.pt")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backbone", default="resnet50")
    args = p.parse_args()
    sd = _state(args.backbone)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _plain_save(sd, folder)
        save_checkpoint(sd, folder)  # warm both paths (page cache, allocator)
        size = (folder / "last.pt").stat().st_size
        for r in range(args.rounds):
            row = {
                "plain_save_s": _timed(lambda: _plain_save(sd, folder)),
                "sealed_save_s": _timed(lambda: save_checkpoint(sd, folder)),
                "plain_load_s": _timed(lambda: torch.load(folder / "plain.pt", map_location="cpu", weights_only=True)),
                "verified_load_s": _timed(lambda: load_checkpoint(folder / "last.pt")),
            }
            for k, v in row.items():
                times.setdefault(k, []).append(v)
            print(json.dumps({"round": r, "bytes": size, **row}), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"backbone": args.backbone, "megabytes": round(size / 2**20, 1),
                      **{k: round(v, 4) for k, v in med.items()},
                      "save_ratio_sealed_over_plain": round(med["sealed_save_s"] / med["plain_save_s"], 3),
                      "load_ratio_verified_over_plain": round(med["verified_load_s"] / med["plain_load_s"], 3)}))


if __name__ == "__main__":
    main()
