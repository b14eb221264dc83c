"""TrainState: everything a resume needs, saved and loaded whole: one object in, one object out.

The state is a dict of tensors and plain Python values only, so it loads with
``weights_only=True`` (never running code); train/checkpoint.py writes, verifies and rotates
the files that hold it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from byol.data.errors import DataError

FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Model (online + target), optimizer, position (step, epoch, step in epoch), what the run
    is (its resolved config, its number of training images), its clock and its monitors' state.

    On disk the run fields sit under ``extra`` (the layout every checkpoint since format 1 has):
    ``{"config", "n_train", "elapsed", "collapsed_at", "planned_steps", "budget_s", "budget_checks"}``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    config: dict = field(default_factory=dict)  # the resolved config (config_to_dict)
    n_train: int | None = None  # training images: a resume must see the same number
    elapsed_s: float = 0.0  # training wall time over all sessions (not the evaluations)
    collapsed_at: int | None = None  # first step whose projections were flagged as collapsed
    planned_steps: int | None = None  # the total steps a train.budget fixed (train/budget.py); None: not yet
    budget_s: float | None = None  # the training time of a train.budget (less the evaluations' reserve)
    budget_checks: list | None = None  # the budget's re-planning checks (train/budget.py Replanner.checks)
    probe: Any = None  # the online linear classifier (eval/diagnostics.py OnlineLinear), when labelled

    def state_dict(self) -> dict[str, Any]:
        extra = {"config": self.config, "elapsed": self.elapsed_s, "n_train": self.n_train}
        if self.collapsed_at is not None:
            extra["collapsed_at"] = self.collapsed_at
        if self.planned_steps is not None:
            extra["planned_steps"] = self.planned_steps
        if self.budget_s is not None:
            extra["budget_s"] = self.budget_s
        if self.budget_checks is not None:
            extra["budget_checks"] = list(self.budget_checks)
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": capture_rng(),
            "extra": extra,
            **({"probe": self.probe.full_state_dict()} if self.probe is not None else {}),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format_version", 0) > FORMAT_VERSION:
            raise DataError(f"checkpoint format {sd['format_version']} is newer than this byol "
                            f"reads ({FORMAT_VERSION}); upgrade byol")
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.step, self.epoch, self.step_in_epoch = sd["step"], sd["epoch"], sd["step_in_epoch"]
        extra = sd.get("extra", {})
        self.config = extra.get("config", self.config)
        self.n_train = extra.get("n_train")
        self.elapsed_s = float(extra.get("elapsed", 0.0))
        self.collapsed_at = extra.get("collapsed_at")
        self.planned_steps = extra.get("planned_steps")
        self.budget_s = extra.get("budget_s")
        self.budget_checks = extra.get("budget_checks")
        if self.probe is not None and "probe" in sd:
            self.probe.load_full_state_dict(sd["probe"])
        restore_rng(sd["rng"])


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
