"""The config of a resumed run: the one saved in ``RUN/config.yaml``, with the few changes a resume
may make. ``byol pretrain --resume`` and ``byol sweep`` (a stopped cell) both build it here.

Not re-exported by :mod:`byol.config`: it looks for the run's checkpoint (``byol.train``), which
the rest of the config package never needs.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from byol.config.loading import apply_overrides, config_from_dict, parse_overrides, read_yaml, saved_run_config
from byol.config.sections import Config, ConfigError

# What a resume may change: where and how it logs and evaluates, not what it trains; and the
# peak learning rate, the remedy for a run that diverged (the schedule keeps its shape).
RESUME_MUTABLE = ("train", "eval")
RESUME_MUTABLE_KEYS = ("optim.base_lr",)
ALLOWED = RESUME_MUTABLE + RESUME_MUTABLE_KEYS  # a section name: every key of that section


def _listed(allowed: Collection[str]) -> str:
    names = [a if "." in a else f"{a}.*" for a in allowed]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_resume_overrides(overrides: list[str], allowed: Collection[str] = ALLOWED) -> None:
    """ConfigError naming the first override that a resumed run may not take."""
    for key in parse_overrides(overrides):
        if key.split(".")[0] not in allowed and key not in allowed:
            raise ConfigError(f"--resume: {key} cannot change in a resumed run (only {_listed(allowed)} "
                              "can); start a new run to change it")


def resume_config(raw: dict) -> dict:
    """The run's saved config, minus the stop step of the session that wrote it: resuming a
    run stopped by ``train.max_steps`` continues to the end unless a new one is given."""
    raw = saved_run_config(raw)
    train = dict(raw.get("train") or {})
    train.pop("max_steps", None)
    return {**raw, "train": train}


def resumed_config(run_dir: str | Path, overrides: list[str] | None = None, *,
                   allowed: Collection[str] = ALLOWED) -> Config:
    """RUN_DIR's saved config (without its ``train.max_steps``) + ``overrides``, each of which
    must be a key or section in ``allowed``. One-line errors when RUN_DIR is not a run directory,
    has no checkpoint (checked before anything is built), or an override is bad or not allowed."""
    from byol.train.checkpoint import find_checkpoint

    overrides = list(overrides or [])
    saved = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume: no such run directory: {run_dir}")
    if not saved.is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
    find_checkpoint(run_dir)  # fail early (which checkpoint loads is the run's choice: the newest
    # that verifies)
    cfg = config_from_dict(apply_overrides(resume_config(read_yaml(saved)), overrides))
    check_resume_overrides(overrides, allowed)
    return cfg
