"""`auto` settings: the rules (given data sizes and a fake device), the probe, and a run that
chooses them (config.yaml keeps the numbers and the reasons; a resume trains the same)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from byol.auto import rules
from byol.auto.choose import choose, choose_settings
from byol.auto.facts import data_facts
from byol.auto.probe import StepProbe, largest_fitting
from byol.auto.rules import DataFacts, DeviceFacts, tau_for_steps
from byol.cli import main
from byol.config import ConfigError, load_config
from byol.config.sections import AUTO_KEYS, auto_keys
from byol.presets import PAPER_BATCH_SIZE, PAPER_SCHEDULES
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from conftest import TINY

CPU = DeviceFacts("cpu", "2 CPU cores")
GPU = DeviceFacts("cuda", "a fake GPU")
ALL_AUTO = [f"{key}=auto" for key in AUTO_KEYS]
IMAGENET = 1_281_167


class FakeProbe:
    """A device whose step at batch B needs ``base + B * per_image`` bytes of ``total``, at
    ``rate(B)`` steps/s; records what it was asked."""

    def __init__(self, total=80e9, base=2e9, per_image=30e6, steps_per_s=2.0):
        self.total, self.base, self.per_image, self.steps_per_s = total, base, per_image, steps_per_s
        self.tried, self.rated = [], []

    def fits(self, batch):
        self.tried.append(batch)
        return self.base + batch * self.per_image <= 0.8 * self.total

    def rate(self, batch):
        self.rated.append(batch)
        return self.steps_per_s


def _choose(overrides, data, device, probe=None):
    probe = probe or FakeProbe()
    cfg = load_config(None, [*ALL_AUTO, *overrides])
    raw, choices, _ = choose(cfg, data, device, lambda c: probe)
    return raw, {c.key: c for c in choices}


def test_every_auto_key_parses_and_a_fixed_key_refuses_auto():
    cfg = load_config(None, ALL_AUTO)
    assert auto_keys(cfg) == list(AUTO_KEYS)
    assert load_config(None, []).optim.batch_size == PAPER_BATCH_SIZE  # the paper's defaults stay
    with pytest.raises(ConfigError, match=r"optim.epochs must be an integer, got 'auto'"):
        load_config(None, ["optim.epochs=auto"])
    with pytest.raises(ConfigError, match=r"augment.size must be >= 8 or auto, got 4"):
        load_config(None, ["augment.size=4"])


@pytest.mark.parametrize("side, device, size, stem", [
    (480, CPU, 32, True),    # phone photos on a CPU: capped
    (480, GPU, 224, False),  # ... on a GPU: the paper's size
    (32, GPU, 32, True),     # CIFAR-sized
    (100, GPU, 96, False),   # the largest ladder size not above the images
    (20, CPU, 32, True),     # tiny images are upsampled to the smallest size
])
def test_size_and_stem_follow_the_images_and_the_device(side, device, size, stem):
    raw, chosen = _choose([], DataFacts(5000, side, 200), device)
    assert raw["augment"]["size"] == size == chosen["augment.size"].value
    assert raw["model"]["cifar_stem"] is stem
    assert f"{side} px" in chosen["augment.size"].reason


@pytest.mark.parametrize("images, device, backbone, width", [
    (50_000, CPU, "resnet18", 0.25), (IMAGENET, CPU, "resnet18", 0.25),
    (50_000, GPU, "resnet18", 1.0), (IMAGENET, GPU, "resnet50", 1.0),
])
def test_backbone_and_width_follow_data_size_and_device(images, device, backbone, width):
    raw, _ = _choose([], DataFacts(images, 256, 200), device)
    assert (raw["model"]["backbone"], raw["model"]["width"]) == (backbone, width)
    heads = (raw["model"]["projector_hidden"], raw["model"]["projector_out"], raw["model"]["predictor_hidden"])
    assert heads == ((512, 128, 512) if device.kind == "cpu" else (4096, 256, 4096))


def test_gpu_batch_is_the_largest_power_of_two_that_fits_with_headroom():
    # 2 GB + 30 MB per image within 80% of 80 GB: 2066 images -> 2048
    probe = FakeProbe()
    raw, chosen = _choose([], DataFacts(IMAGENET, 256, 200), GPU, probe)
    assert raw["optim"]["batch_size"] == 2048
    assert probe.tried == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert "fits in device memory" in chosen["optim.batch_size"].reason
    # a larger device: the paper's 4096 caps it; a small dataset: 8 steps an epoch at least
    raw, _ = _choose([], DataFacts(IMAGENET, 256, 200), GPU, FakeProbe(total=1e12))
    assert raw["optim"]["batch_size"] == 4096
    raw, _ = _choose([], DataFacts(3000, 256, 200), GPU, FakeProbe(total=1e12))
    assert raw["optim"]["batch_size"] == 256  # 3000 / 8 = 375 -> 256


def test_gpu_batch_that_never_fits_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="a batch of 32 at 224 px does not fit in a fake GPU's memory"):
        _choose([], DataFacts(IMAGENET, 256, 200), GPU, FakeProbe(total=1e9))


def test_cpu_batch_is_capped_and_splits_over_processes():
    raw, _ = _choose([], DataFacts(50_000, 32, 200), CPU)
    assert raw["optim"]["batch_size"] == 256
    raw, _ = _choose([], DataFacts(216, 110, 200), CPU)
    assert raw["optim"]["batch_size"] == 16  # 216 / 8 = 27 -> 16
    raw, _ = _choose([], DataFacts(50_000, 32, 200), DeviceFacts("cpu", "x", processes=3))
    assert raw["optim"]["batch_size"] % 3 == 0


def test_tau_rule_passes_through_the_paper_presets_and_rises_with_the_steps():
    steps_per_epoch = IMAGENET // PAPER_BATCH_SIZE  # 312
    assert tau_for_steps(40 * steps_per_epoch) == pytest.approx(PAPER_SCHEDULES[40]["tau_base"], abs=0.002)
    assert tau_for_steps(1000 * steps_per_epoch) == PAPER_SCHEDULES[1000]["tau_base"]
    assert tau_for_steps(300 * steps_per_epoch) == pytest.approx(PAPER_SCHEDULES[300]["tau_base"], abs=0.003)
    taus = [tau_for_steps(s) for s in (10, 500, 2000, 10_000, 100_000, 10**7)]
    assert taus == sorted(taus) and taus[0] == rules.TAU_RANGE[0] and taus[-1] == rules.TAU_RANGE[1]


def test_steps_come_from_epochs_or_from_the_probed_rate_under_a_budget():
    data = DataFacts(50_000, 32, 200)
    raw, chosen = _choose(["train.budget=null", "optim.epochs=100"], data, CPU)
    steps = 100 * (50_000 // 256)
    assert raw["method"]["tau_base"] == tau_for_steps(steps)
    assert raw["optim"]["warmup_epochs"] == 10.0  # the paper's, a tenth of 100 epochs
    assert f"{steps} steps" in chosen["method.tau_base"].reason and "about" not in chosen["method.tau_base"].reason
    probe = FakeProbe(steps_per_s=3.0)
    raw, chosen = _choose(["train.budget=10m"], data, CPU, probe)
    assert probe.rated == [256] and probe.tried == []  # a CPU is not memory-probed
    assert raw["method"]["tau_base"] == tau_for_steps(1800)
    assert raw["optim"]["warmup_epochs"] == round(0.1 * 1800 / (50_000 // 256), 2)
    assert "about 1800 steps" in chosen["method.tau_base"].reason


def test_a_short_run_gets_a_faster_predictor_and_a_long_one_the_papers():
    data = DataFacts(50_000, 32, 200)
    raw, chosen = _choose(["train.budget=10m"], data, CPU, FakeProbe(steps_per_s=3.0))  # about 1800 steps
    assert raw["optim"]["predictor_lr_scale"] == rules.FAST_PREDICTOR_SCALE == 10.0
    assert "about 1800 steps <= 2000" in chosen["optim.predictor_lr_scale"].reason
    raw, chosen = _choose(["train.budget=null", "optim.epochs=100"], data, CPU)  # 19,500 steps
    assert raw["optim"]["predictor_lr_scale"] == 1.0 and "the paper's" in chosen["optim.predictor_lr_scale"].reason
    # only where it is auto: a number in the config stays
    raw, chosen = _choose(["train.budget=10m", "optim.predictor_lr_scale=3"], data, CPU)
    assert raw["optim"]["predictor_lr_scale"] == 3.0 and "optim.predictor_lr_scale" not in chosen


def test_gpu_base_lr_is_the_paper_preset_of_the_nearest_length():
    data = DataFacts(IMAGENET, 256, 200)
    for epochs, lr in ((40, 0.45), (300, 0.3), (1000, 0.2)):
        raw, _ = _choose(["train.budget=null", f"optim.epochs={epochs}"], data, GPU, FakeProbe(total=1e12))
        assert raw["optim"]["base_lr"] == lr == PAPER_SCHEDULES[epochs]["base_lr"]


def test_given_values_are_kept_and_only_auto_keys_are_chosen():
    cfg = load_config(None, ["augment.size=auto", "optim.batch_size=64"])
    raw, choices, steps = choose(cfg, DataFacts(50_000, 32, 200), CPU, lambda c: FakeProbe())
    assert [c.key for c in choices] == ["augment.size"]
    assert raw["optim"]["batch_size"] == 64 and raw["model"]["backbone"] == "resnet50"
    named = load_config(None, ["model.backbone=torchvision/resnet18", "model.width=auto", "model.cifar_stem=auto"])
    raw, _, _ = choose(named, DataFacts(50_000, 32, 200), CPU, lambda c: FakeProbe())
    assert (raw["model"]["width"], raw["model"]["cifar_stem"]) == (1.0, False)


def test_a_config_without_auto_is_returned_unchanged_with_its_notes():
    cfg = load_config(None, [*TINY, "optim.epochs=100"])
    out, chosen = choose_settings(cfg, None, 5000, rt=None)
    assert out is cfg and chosen.choices == [] and chosen.notes == [] and chosen.steps == 100 * 5000 // 8
    short = load_config(None, [*TINY, "optim.epochs=1"])
    _, chosen = choose_settings(short, None, 3000, rt=None)  # 375 steps
    assert chosen.steps == 375 and chosen.notes[0].startswith("about 375 steps on 3000 images: below 500")
    with_init = load_config(None, [*TINY, "optim.epochs=1", "model.init=weights.pt"])
    assert choose_settings(with_init, None, 3000, rt=None)[1].notes == []


def test_a_budget_too_short_for_the_data_is_said_in_the_notes():
    probe = FakeProbe(steps_per_s=0.5)  # 5 minutes -> 150 steps
    cfg = load_config(None, [*ALL_AUTO, "train.budget=5m"])
    _, _, steps = choose(cfg, DataFacts(8000, 96, 200), CPU, lambda c: probe)
    assert steps == 150
    assert rules.small_data_note(8000, None, steps).startswith("about 150 steps on 8000 images: below 500")
    assert rules.small_data_note(8000, None, 5000) is None


def test_largest_fitting_doubles_until_the_first_misfit():
    assert largest_fitting(lambda b: b <= 700, 32, 4096) == 512
    assert largest_fitting(lambda b: True, 32, 100) == 64
    assert largest_fitting(lambda b: False, 32, 4096) is None


def test_the_probe_steps_a_copy_and_leaves_the_global_random_state_alone():
    cfg = load_config(None, TINY)
    state = torch.get_rng_state()
    probe = StepProbe(cfg, torch.device("cpu"), "fp32")
    assert probe.rate(8, steps=2, warmup=1) > 0
    assert torch.equal(torch.get_rng_state(), state)


def _photo_folder(root, n_per_class=40):
    """Two classes of mixed-size JPEGs (long side 90..160 px), some portrait, some grayscale."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            w, h = int(rng.integers(70, 160)), int(rng.integers(70, 160))
            img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8) + np.uint8(100 * c)
            im = Image.fromarray(img)
            (im.convert("L") if i % 7 == 0 else im).save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return root


def test_data_facts_read_the_headers_of_a_sample(tmp_path):
    from byol.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(_photo_folder(tmp_path / "photos"))
    facts = data_facts(ds, n_train=70)
    sides = sorted(min(Image.open(f).size) for f in ds.files)
    assert facts.sampled == 80 and facts.short_side == int(np.median(sides)) and facts.images == 70


def test_byol_pretrain_on_a_folder_with_only_a_budget(tmp_path, capsys):
    """The one-command run: no --config; every auto value is chosen, printed with its reason and
    written to config.yaml as a number; a resume of the stopped run trains on to the same end."""
    photos = _photo_folder(tmp_path / "photos")
    common = [f"data.path={photos}", f"train.out_dir={tmp_path}", "train.name=own", "train.progress=false",
              "data.num_workers=0", "train.threads=1", "eval.knn_k=5"]
    code = main(["pretrain", *common, "train.budget=10s", "train.max_steps=16"])
    out = capsys.readouterr().out
    assert code == 0
    run = tmp_path / "own"
    text = (run / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    for key in AUTO_KEYS:
        section, name = key.split(".")
        assert saved[section][name] != "auto"
        assert f"  auto:   {key}=" in out and f"#   {key}=" in text
    assert saved["augment"]["size"] == 32 and saved["model"]["backbone"] == "resnet18"
    assert saved["optim"]["batch_size"] == 8  # 72 training images / 8 -> 9 -> 8
    assert "stopped at step 16" in out
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "train.threads=1"]) == 0
    out = capsys.readouterr().out
    assert "auto:" not in out  # nothing is chosen again: the saved numbers are the config
    assert (run / "config.yaml").read_text().startswith(text.split("data:")[0])  # the reasons stay
    summary = json.loads((run / "summary.json").read_text())
    ckpt = load_checkpoint(find_checkpoint(run))
    assert summary["finished"] and ckpt["step"] == ckpt["extra"]["planned_steps"] == summary["total_steps"]
    assert json.loads((run / "eval" / "knn.json").read_text())["top1"] >= 0


def test_byol_pretrain_without_config_or_data_is_one_line(tmp_path, capsys):
    code = main(["pretrain", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "data.path: required" in err
