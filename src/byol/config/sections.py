"""The seven config sections as typed, frozen dataclasses, validated at construction.

A config has seven sections (Data, Augment, Model, Method, Optim, Train, Eval); every field has a
default, a YAML file sets some of them, and command-line overrides such as ``optim.epochs=1`` win
over both. Validation happens at construction (``__post_init__``) and every failure is a
``ConfigError`` whose message names the key and the bad value.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from byol.presets import (
    AUGMENT_ABLATIONS,
    AUGMENT_SEMANTICS,
    AUGMENT_SETS,
    BYOL_AUGMENT,
    METHOD_PRESETS,
    PAPER_BATCH_SIZE,
    PAPER_EPOCHS,
    PAPER_MOMENTUM,
    PAPER_SCHEDULES,
    PAPER_TRUST_COEFFICIENT,
    PAPER_WARMUP_EPOCHS,
)

# The defaults are the paper's: its Table 6 (docs/method.md §3) and its 1000-epoch run (§4).
_T6 = BYOL_AUGMENT
_PAPER = PAPER_SCHEDULES[PAPER_EPOCHS]


# ``auto``: the run chooses the value from the data and the device when it starts (byol.auto,
# docs/auto.md); the keys that take it are AUTO_KEYS.
AUTO = "auto"
Auto = Literal["auto"]
AUTO_KEYS = ("augment.size", "model.backbone", "model.width", "model.cifar_stem", "model.projector_hidden",
             "model.projector_out", "model.predictor_hidden", "optim.batch_size", "optim.base_lr",
             "optim.warmup_epochs", "optim.predictor_lr_scale", "method.tau_base")


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def auto_keys(cfg: Config) -> list[str]:
    """The keys of ``cfg`` still set to ``auto``."""
    return [key for key in AUTO_KEYS if is_auto(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))]


class ConfigError(ValueError):
    """A user mistake in a config file or override; ``str()`` is one line naming the key."""


def _check(cond: bool, key: str, rule: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config: {key} must be {rule}, got {value!r}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, f"one of {', '.join(map(str, choices))}", value)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_budget(text: str, key: str = "train.budget") -> float:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"1h30m"`` -> seconds (> 0); else a one-line ConfigError."""
    match = _DURATION.fullmatch(str(text).strip())
    if not text or match is None or not any(match.groups()):
        raise ConfigError(f"config: {key} must be a duration such as 90s, 10m, 2h or 1h30m, got {text!r}")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise ConfigError(f"config: {key} must be a duration > 0, got {text!r}")
    return seconds


def _prob(key: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, key, "in [0, 1]", value)


@dataclass(frozen=True)
class Data:
    """Where images come from. ``dataset``: "folder" (``path``, recursive) or "shapes" (built in)."""

    dataset: str = "folder"
    # a folder of images, or tar shards: a brace pattern (shards/train-{000000..000099}.tar), a .tar,
    # or a folder of .tar files (byol.data.shards; written by `byol shard`)
    path: str | None = None
    format: str = "auto"  # auto (shards when path looks like them, see above) | folder | shards
    shuffle_buffer: int = 10_000  # shards: samples in the seeded shuffle buffer after the shard order
    limit: int | None = None  # a seeded random subset of this many files
    val_fraction: float = 0.1  # held out per class (labelled data) for the kNN evaluation
    bad_files: str = "skip"  # skip (count and list them) | fail (stop, naming the file)
    verify: str = "quick"  # quick (header/trailer check) | full (decode every file up front)
    # Images whose header declares more pixels are refused undecoded (decompression bombs);
    # null: no limit. 250 MP is above a 200-MP phone photo (byol.data.headers.DEFAULT_MAX_PIXELS).
    max_pixels: int | None = 250_000_000
    num_workers: int | None = None  # None: 0 on <= 2 cores, min(4, cores / 2) on the CPU, min(8, cores) on CUDA
    shapes_size: int = 4000  # images of the built-in "shapes" dataset
    shapes_image_size: int = 32
    shapes_colour: bool = False  # random colours and backgrounds too (harder; not the demo's)
    seed: int = 0  # for limit, the held-out split and the shapes dataset

    def __post_init__(self) -> None:
        _one_of("data.dataset", self.dataset, ("folder", "shapes"))
        _one_of("data.format", self.format, ("auto", "folder", "shards"))
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", self.shuffle_buffer)
        _one_of("data.bad_files", self.bad_files, ("skip", "fail"))
        _one_of("data.verify", self.verify, ("quick", "full"))
        _check(self.limit is None or self.limit > 0, "data.limit", "> 0 or null", self.limit)
        mp = self.max_pixels
        _check(mp is None or mp > 0, "data.max_pixels", "> 0 or null", mp)
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "in [0, 1)", self.val_fraction)
        w = self.num_workers
        _check(w is None or w >= 0, "data.num_workers", ">= 0 or null", w)
        _check(self.shapes_size >= 2, "data.shapes_size", ">= 2", self.shapes_size)
        _check(self.shapes_image_size >= 8, "data.shapes_image_size", ">= 8", self.shapes_image_size)


@dataclass(frozen=True)
class Augment:
    """The two view distributions T, T' (docs/method.md §3). ``preset`` fills the fields not given."""

    preset: str = "byol"  # a key of presets.AUGMENT_SETS: byol (224 px) | byol32 (no blur)
    ablation: str = "full"  # full | no_colour | no_grayscale | crop_only | crop_blur | crop_colour
    backend: str = "batched"  # batched (photometric ops on the device) | reference (all per image in the loader)
    # official: every op as the authors' released code computes it (docs/fidelity.md) |
    # torchvision: torchvision.transforms.v2's ops, what the PyTorch BYOL libraries use
    semantics: str = "official"
    size: int | Auto = _T6["size"]  # auto: from the images' size and the device
    # the evaluation images' size (kNN, probes, embed, export); null: size. Trained on crops at a
    # smaller size, a convnet sees objects larger than in whole images of that size, and does
    # better evaluated larger (docs/benchmarks.md, the 10-minute CPU preset)
    eval_size: int | None = None
    crop_scale: tuple[float, float] = _T6["crop_scale"]
    crop_ratio: tuple[float, float] = _T6["crop_ratio"]
    flip_prob: float = _T6["flip_prob"]
    jitter_prob: float = _T6["jitter_prob"]
    brightness: float = _T6["brightness"]
    contrast: float = _T6["contrast"]
    saturation: float = _T6["saturation"]
    hue: float = _T6["hue"]
    grayscale_prob: float = _T6["grayscale_prob"]
    blur_prob: tuple[float, float] = _T6["blur_prob"]  # (T, T')
    blur_sigma: tuple[float, float] = _T6["blur_sigma"]
    solarize_prob: tuple[float, float] = _T6["solarize_prob"]  # (T, T')
    mean: tuple[float, float, float] = _T6["mean"]
    std: tuple[float, float, float] = _T6["std"]

    def __post_init__(self) -> None:
        _one_of("augment.preset", self.preset, tuple(AUGMENT_SETS))
        _one_of("augment.backend", self.backend, ("reference", "batched"))
        _one_of("augment.semantics", self.semantics, AUGMENT_SEMANTICS)
        _one_of("augment.ablation", self.ablation, tuple(AUGMENT_ABLATIONS))
        _check(is_auto(self.size) or self.size >= 8, "augment.size", ">= 8 or auto", self.size)
        _check(self.eval_size is None or self.eval_size >= 8, "augment.eval_size", ">= 8 or null", self.eval_size)
        lo, hi = self.crop_scale
        _check(0.0 < lo <= hi <= 1.0, "augment.crop_scale", "0 < min <= max <= 1", self.crop_scale)
        # The rest is ViewSpec's own validation (one set of rules), run now so that a bad value
        # fails before any data is opened.
        from byol.augment.views import ViewSpec

        shared = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("preset", "ablation", "backend", "semantics", "blur_prob", "solarize_prob",
                               "eval_size")}
        if is_auto(self.size):  # the rest is checked as at the largest size auto can choose
            shared["size"] = _T6["size"]
        try:
            for view in (0, 1):
                ViewSpec(**shared, blur_prob=self.blur_prob[view], solarize_prob=self.solarize_prob[view])
        except ValueError as exc:
            raise ConfigError(f"config: {exc}") from None

    @property
    def eval_px(self) -> int | Auto:
        """The size evaluation images are resized to: ``eval_size``, else ``size``."""
        return self.size if self.eval_size is None else self.eval_size


@dataclass(frozen=True)
class Model:
    """Encoder f and heads g, q (docs/method.md §2).

    ``backbone``: one of our ResNets (resnet18..resnet200), ``torchvision/NAME`` (a torchvision
    classification model) or ``timm/NAME`` (``pip install 'byol[timm]'``), headless
    (byol.models.named). width, cifar_stem, padding, backbone_norm, zero_init_residual and
    bn_free_init describe our ResNets only. ``init``: null (random), ``pretrained`` (a named
    backbone's published weights) or the path of a state dict (.pt/.pth/.safetensors) loaded into
    the encoder before training, online and target alike.
    """

    backbone: str = "resnet50"  # or auto (from the data and the device, with width and cifar_stem)
    width: float | Auto = 1.0
    cifar_stem: bool | Auto = False
    projector_hidden: int | Auto = 4096
    projector_out: int | Auto = 256
    predictor_hidden: int | Auto = 4096
    head_norm: str = "bn"  # hidden-layer norm of the projector (and of the predictor unless set)
    predictor_norm: str | None = None  # the predictor's own: bn | ln | none; null: head_norm
    backbone_norm: str = "bn"  # bn | gn_ws (GroupNorm + weight standardisation) | none (docs/method.md §8)
    bn_free_init: bool = False  # replace every BN by an affine after one calibration pass (§8)
    bn_free_heads: bool = True  # with bn_free_init: the heads' BN too (false: only the encoders')
    target_init: str = "independent"
    concat_views: bool = False
    # the ResNets' strided convs and max pool: symmetric (torchvision's) | same (TensorFlow's
    # "SAME", extra pixel at the bottom/right; what the released weights were trained with)
    padding: str = "symmetric"
    zero_init_residual: bool = False  # each residual block's last BN scale starts at 0 (the release's init)
    init: str | None = None  # null (random) | pretrained (named backbones) | PATH of a state dict for the encoder

    def __post_init__(self) -> None:
        from byol.models.backbones import RESNET_SPECS
        from byol.models.heads import HEAD_NORMS
        from byol.models.named import check_torchvision_name, split_backbone
        from byol.models.norms import BACKBONE_NORMS

        named = None if is_auto(self.backbone) else split_backbone(self.backbone)
        if is_auto(self.backbone):
            pass
        elif named is None:
            _check(self.backbone in RESNET_SPECS, "model.backbone",
                   f"one of {', '.join(RESNET_SPECS)}, torchvision/NAME or timm/NAME", self.backbone)
        elif named[0] == "torchvision" and (reason := check_torchvision_name(named[1])) is not None:
            raise ConfigError(f"config: model.backbone: {reason}")
        elif named:  # options of our ResNets only
            ours = {"width": 1.0, "cifar_stem": False, "padding": "symmetric", "backbone_norm": "bn",
                    "zero_init_residual": False, "bn_free_init": False}
            for key, default in ours.items():
                _check(getattr(self, key) in (default, AUTO), f"model.{key}",
                       f"{default!r} with model.backbone={self.backbone} (an option of our ResNets)",
                       getattr(self, key))
        _check(self.init is None or (self.init != "pretrained" or named is not None), "model.init",
               "a state-dict PATH or null for our ResNets (pretrained: torchvision/NAME or timm/NAME)",
               self.init)
        _check(self.init is None or bool(str(self.init).strip()), "model.init", "pretrained, a PATH or null",
               self.init)
        _check(is_auto(self.width) or self.width > 0, "model.width", "> 0 or auto", self.width)
        for key in ("projector_hidden", "projector_out", "predictor_hidden"):
            value = getattr(self, key)
            _check(is_auto(value) or value > 0, f"model.{key}", "> 0 or auto", value)
        _one_of("model.head_norm", self.head_norm, HEAD_NORMS)
        if self.predictor_norm is not None:
            _one_of("model.predictor_norm", self.predictor_norm, HEAD_NORMS)
        _one_of("model.target_init", self.target_init, ("independent", "copy"))
        _one_of("model.padding", self.padding, ("symmetric", "same"))
        # bn | gn_ws | none: the fourth, affine, only the BN-free init makes (model.bn_free_init)
        _one_of("model.backbone_norm", self.backbone_norm, BACKBONE_NORMS[:3])
        _check(not self.bn_free_init or self.backbone_norm == "bn", "model.backbone_norm",
               "bn with model.bn_free_init=true (the init replaces BN layers)", self.backbone_norm)


@dataclass(frozen=True)
class Method:
    """Which member of the BYOL family (docs/method.md §7). BYOL: the defaults."""

    name: str = "byol"  # a preset (presets.METHOD_PRESETS): byol | simsiam | simclr | moco
    predictor: bool = True
    target: str = "ema"  # ema | online_stopgrad (SimSiam) | online
    loss: str = "regression"  # regression (2 - 2cos) | infonce (docs/method.md §7, alpha and beta)
    alpha: float = 0.1  # infonce temperature
    beta: float = 0.0  # infonce weight of the negatives: 0 (BYOL's objective) .. 1 (SimCLR's)
    tau_base: float | Auto = _PAPER["tau_base"]  # auto: from the run's steps
    tau_schedule: str = "cosine"  # cosine (docs/method.md §1) | constant
    queue_size: int = 0  # > 0: infonce negatives from a FIFO queue of past target projections (MoCo)

    def __post_init__(self) -> None:
        _one_of("method.name", self.name, tuple(METHOD_PRESETS))
        _one_of("method.target", self.target, ("ema", "online_stopgrad", "online"))
        _one_of("method.loss", self.loss, ("regression", "infonce"))
        _check(self.alpha > 0, "method.alpha", "> 0", self.alpha)
        _prob("method.beta", self.beta)
        if not is_auto(self.tau_base):
            _prob("method.tau_base", self.tau_base)
        _one_of("method.tau_schedule", self.tau_schedule, ("cosine", "constant"))
        _check(self.queue_size >= 0, "method.queue_size", ">= 0", self.queue_size)
        _check(not self.queue_size or (self.loss == "infonce" and self.beta > 0), "method.queue_size",
               "0 unless method.loss=infonce with method.beta > 0 (the queue holds negatives)",
               self.queue_size)


@dataclass(frozen=True)
class Optim:
    """Optimiser and schedules (docs/method.md §4). The lr is base_lr * batch_size / 256."""

    name: str = "lars"
    batch_size: int | Auto = PAPER_BATCH_SIZE  # global batch; auto: from the data and the device's memory
    epochs: int = PAPER_EPOCHS
    base_lr: float | Auto = _PAPER["base_lr"]  # auto: from the device and the run's length
    # capped at epochs (a 1-epoch trial run works); auto: from the run's length
    warmup_epochs: float | Auto = float(PAPER_WARMUP_EPOCHS)
    weight_decay: float = _PAPER["weight_decay"]
    momentum: float = PAPER_MOMENTUM
    trust_coefficient: float = PAPER_TRUST_COEFFICIENT
    # micro-batches per optimizer step: the batch is split in N (per rank), gradients averaged;
    # one optimizer step and one EMA update per N micro-batches, schedules count steps (train/step.py)
    accumulate_steps: int = 1
    # the predictor's lr as a multiple of the schedule's (1: the paper); a faster predictor helps
    # short runs (docs/benchmarks.md, the 10-minute CPU preset); auto: from the run's length
    predictor_lr_scale: float | Auto = 1.0

    def __post_init__(self) -> None:
        from byol.optim import OPTIMIZERS

        _one_of("optim.name", self.name, OPTIMIZERS)
        batch = 2 * self.accumulate_steps if is_auto(self.batch_size) else self.batch_size
        _check(batch >= 2, "optim.batch_size", ">= 2 (BN needs two samples) or auto", self.batch_size)
        _check(self.epochs >= 1, "optim.epochs", ">= 1", self.epochs)
        _check(is_auto(self.base_lr) or self.base_lr > 0, "optim.base_lr", "> 0 or auto", self.base_lr)
        _check(is_auto(self.warmup_epochs) or self.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0 or auto",
               self.warmup_epochs)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _check(self.trust_coefficient > 0, "optim.trust_coefficient", "> 0", self.trust_coefficient)
        _check(self.accumulate_steps >= 1, "optim.accumulate_steps", ">= 1", self.accumulate_steps)
        _check(is_auto(self.predictor_lr_scale) or self.predictor_lr_scale > 0, "optim.predictor_lr_scale",
               "> 0 or auto", self.predictor_lr_scale)
        _check(batch % self.accumulate_steps == 0, "optim.batch_size",
               f"a multiple of optim.accumulate_steps={self.accumulate_steps} (the batch is split into "
               "that many micro-batches)", self.batch_size)


@dataclass(frozen=True)
class Train:
    """The run: where it writes, how often it logs and checkpoints."""

    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    out_dir: str = "runs"
    name: str | None = None  # run directory name; default: <config name>-<timestamp>
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints/last.pt updates (and each epoch end)
    keep_every_epochs: int = 0  # also keep checkpoints/epoch_NNNN.pt every N epochs (0: never)
    max_steps: int | None = None  # stop (and checkpoint) at this global step; schedules unchanged
    # a time budget (90s, 10m, 2h, 1h30m) fixing the total steps from the measured rate; optim.epochs
    # is then ignored; max_steps still stops early (train/budget.py); null: off
    budget: str | None = None
    threads: int | None = None  # torch CPU threads; None: torch's default
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with native bf16) | fp32 | bf16
    channels_last: bool = True  # NHWC memory format for the convolutions (faster on CPU and GPU)
    compile: bool = False  # torch.compile the model's forward (minutes of compiling first)
    malloc_tuning: bool = True  # on the CPU (glibc): keep freed memory in the heap, no mmap churn
    progress: bool = True
    nonfinite: str = "stop"  # a non-finite loss/weights: stop (keep the last good checkpoint) | skip the step

    def __post_init__(self) -> None:
        _one_of("train.nonfinite", self.nonfinite, ("stop", "skip"))
        _check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", self.checkpoint_every)
        _check(self.keep_every_epochs >= 0, "train.keep_every_epochs", ">= 0", self.keep_every_epochs)
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", ">= 1 or null",
               self.max_steps)
        _check(self.threads is None or self.threads >= 1, "train.threads", ">= 1 or null", self.threads)
        if self.budget is not None:

            parse_budget(self.budget)
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        dev = self.device
        ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _check(ok, "train.device", "auto, cpu, cuda or cuda:N", dev)


@dataclass(frozen=True)
class Eval:
    """Evaluation during and after pretraining: weighted kNN on frozen features (docs/method.md §5),
    an online linear classifier on detached representations and collapse diagnostics."""

    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 256
    final_knn: bool = True  # after training, when the data has labels
    initial_knn: bool = False  # also at random init, before the first step (the demo's baseline)
    knn_every: int = 0  # epochs between held-out kNN monitors during training (0: only the final)
    online_linear: bool = True  # train a linear classifier on y.detach() beside BYOL (labelled data)
    online_linear_lr: float = 1e-3
    collapse_every: int = 50  # steps between effective-rank diagnostics (z_std is every log row)
    collapse_threshold: float = 0.1  # z_std below this flags collapse (healthy ~0.3-1)

    def __post_init__(self) -> None:
        _check(self.knn_k >= 1, "eval.knn_k", ">= 1", self.knn_k)
        _check(self.knn_temperature > 0, "eval.knn_temperature", "> 0", self.knn_temperature)
        _check(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        _check(self.knn_every >= 0, "eval.knn_every", ">= 0", self.knn_every)
        _check(self.online_linear_lr > 0, "eval.online_linear_lr", "> 0", self.online_linear_lr)
        _check(self.collapse_every >= 1, "eval.collapse_every", ">= 1", self.collapse_every)
        _check(0 < self.collapse_threshold < 1, "eval.collapse_threshold", "in (0, 1)",
               self.collapse_threshold)


@dataclass(frozen=True)
class Config:
    data: Data = field(default_factory=Data)
    augment: Augment = field(default_factory=Augment)
    model: Model = field(default_factory=Model)
    method: Method = field(default_factory=Method)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)

    def __post_init__(self) -> None:
        from byol.models.named import is_convolutional

        aug, backbone = self.augment, self.model.backbone
        if aug.eval_size not in (None, aug.size) and not is_auto(backbone) and not is_convolutional(backbone):
            raise ConfigError(f"config: augment.eval_size={aug.eval_size} needs a convolutional backbone; "
                              f"{backbone} takes one image size (augment.size={aug.size})")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
