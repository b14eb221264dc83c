"""A run's ``auto`` values, chosen once when a new run starts (docs/auto.md):

    cfg, chosen = choose_settings(cfg, images, n_train, rt)

``images`` is the run's raw dataset, ``n_train`` its training images (after the held-out split),
``rt`` the Runtime. The rules are byol.auto.rules; the device probes byol.auto.probe. The chosen
config has numbers where it had ``auto``: the run saves that config (config.yaml, with the reasons
as comments), so a resume or a rerun with that file trains the same. Under torchrun rank 0
chooses and every rank takes its choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from byol import distributed
from byol.auto.facts import data_facts, device_facts
from byol.auto.probe import START_BATCH, StepProbe, largest_fitting
from byol.auto.rules import (
    BATCH_CAP,
    Choice,
    DataFacts,
    DeviceFacts,
    choose_backbone,
    choose_base_lr,
    choose_batch,
    choose_heads,
    choose_predictor_lr,
    choose_size,
    choose_stem,
    choose_tau,
    choose_warmup,
    choose_width,
    small_data_note,
)
from byol.config import Config, ConfigError, config_from_dict, config_to_dict
from byol.config.sections import auto_keys, parse_budget


@dataclass
class Chosen:
    """What ``choose_settings`` decided: a Choice per ``auto`` key, and notes for the user."""

    choices: list[Choice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: int | None = None  # the run's expected steps (estimated under a budget), when known


class _Picker:
    """The config as a dict, filled key by key: a rule's Choice lands where the key is ``auto``."""

    def __init__(self, cfg: Config) -> None:
        self.raw, self.auto, self.choices = config_to_dict(cfg), set(auto_keys(cfg)), []

    def get(self, key: str):
        section, name = key.split(".")
        return self.raw[section][name]

    def wants(self, key: str) -> bool:
        return key in self.auto

    def take(self, choice: Choice) -> None:
        if self.wants(choice.key):
            section, name = choice.key.split(".")
            self.raw[section][name] = choice.value
            self.choices.append(choice)

    def config(self, **placeholders) -> Config:
        """The config so far; keys still ``auto`` take ``placeholders`` (section.field -> value)."""
        raw = {s: dict(v) for s, v in self.raw.items()}
        for key, value in placeholders.items():
            if self.wants(key) and key not in {c.key for c in self.choices}:
                section, name = key.split(".")
                raw[section][name] = value
        return config_from_dict(raw)


def choose_settings(cfg: Config, images, n_train: int, rt) -> tuple[Config, Chosen]:
    """``cfg`` with every ``auto`` value chosen, and the choices with their reasons."""
    if not auto_keys(cfg):
        steps = None if cfg.train.budget else max(1, n_train // cfg.optim.batch_size) * cfg.optim.epochs
        return cfg, Chosen(notes=_notes(cfg, n_train, steps), steps=steps)
    if distributed.is_main():
        data = data_facts(images, n_train, cfg.data.seed)
        device = device_facts(rt.device, rt.world)
        raw, choices, steps = choose(cfg, data, device, lambda c: StepProbe(c, rt.device, rt.precision, rt.world))
        if rt.device.type == "cuda":  # the probe's model is gone: give its cached memory back
            torch.cuda.empty_cache()
    else:
        raw = choices = steps = None
    raw, choices, steps = distributed.broadcast_object((raw, choices, steps))
    chosen_cfg = config_from_dict(raw)
    return chosen_cfg, Chosen(choices, _notes(chosen_cfg, n_train, steps), steps)


def auto_comments(chosen: Chosen) -> list[str]:
    """The lines config.yaml starts with: what ``auto`` chose and why (empty when nothing was)."""
    if not chosen.choices:
        return []
    return ["chosen when the run started (auto, docs/auto.md):",
            *(f"  {c.line()}" for c in chosen.choices)]


def _notes(cfg: Config, n_train: int, steps: int | None) -> list[str]:
    note = small_data_note(n_train, cfg.model.init, steps)
    return [note] if note else []


def choose(cfg: Config, data: DataFacts, device: DeviceFacts,
           make_probe) -> tuple[dict, list[Choice], int | None]:
    """The rules in order (size, model, batch, length-dependent lr, tau, warm-up and predictor lr) -> (the
    chosen config as a dict, the choices, the expected steps when a rule needed them).
    ``make_probe(cfg)``: a StepProbe (or a fake in tests) for a config whose shape is chosen;
    made at most once, and only when a rule needs it."""
    p = _Picker(cfg)
    _choose_shape(p, data, device)
    placeholders = {"optim.batch_size": 2 * cfg.optim.accumulate_steps * device.processes,
                    "optim.base_lr": 1.0, "method.tau_base": 0.99, "optim.warmup_epochs": 0.0,
                    "optim.predictor_lr_scale": 1.0}
    probes: list = []

    def probe():
        if not probes:
            probes.append(make_probe(p.config(**placeholders)))
        return probes[0]

    if p.wants("optim.batch_size"):
        p.take(choose_batch(data, device, _largest_batch(p, data, device, probe)))
    steps = None
    if any(p.wants(k) for k in ("optim.base_lr", "method.tau_base", "optim.warmup_epochs",
                                "optim.predictor_lr_scale")):
        steps = _choose_by_length(p, data, device, probe)
    return p.raw, p.choices, steps


def _choose_shape(p: _Picker, data: DataFacts, device: DeviceFacts) -> None:
    """Image size, encoder and heads: what the data and the device call for."""
    p.take(choose_size(data, device))
    named = "/" in str(p.get("model.backbone"))
    p.take(choose_backbone(data, device))
    if named:  # width and stem are options of our ResNets
        p.take(Choice("model.width", 1.0, "a named backbone has no width option"))
        p.take(Choice("model.cifar_stem", False, "a named backbone has its own stem"))
    else:
        p.take(choose_width(device))
        p.take(choose_stem(p.get("augment.size")))
    for choice in choose_heads(device):
        p.take(choice)


def _largest_batch(p: _Picker, data: DataFacts, device: DeviceFacts, probe) -> int | None:
    """On a GPU: the largest power-of-two batch the memory probe fits (None on a CPU)."""
    if device.kind != "cuda":
        return None
    cap = min(BATCH_CAP["cuda"], max(START_BATCH, data.images))
    fits = largest_fitting(probe().fits, START_BATCH, cap)
    if fits is None:
        raise ConfigError(f"config: optim.batch_size=auto: a batch of {START_BATCH} at "
                          f"{p.get('augment.size')} px does not fit in {device.name}'s memory; "
                          "set a smaller augment.size or model")
    return fits


def _choose_by_length(p: _Picker, data: DataFacts, device: DeviceFacts, probe) -> int:
    """base_lr, tau_base, the warm-up and the predictor's lr from the run's steps: epochs x steps an epoch, or under
    a budget the budget x the probed step rate. -> those steps."""
    batch = p.get("optim.batch_size")
    steps_per_epoch = max(1, data.images // batch)
    budget = p.get("train.budget")
    if budget is None:
        steps, estimated = steps_per_epoch * p.get("optim.epochs"), False
    else:
        steps, estimated = max(1, math.floor(parse_budget(budget) * probe().rate(batch))), True
    epochs = steps / steps_per_epoch
    p.take(choose_base_lr(device, epochs))
    p.take(choose_tau(steps, estimated))
    p.take(choose_warmup(epochs))
    p.take(choose_predictor_lr(steps, estimated))
    return steps
