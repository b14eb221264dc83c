"""Config loading, overrides and one-line validation errors."""
from pathlib import Path

import pytest
import yaml

from byol.config import Config, ConfigError, config_to_dict, load_config, replace, save_config
from byol.presets import PAPER_SCHEDULES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_paper():
    cfg = Config()
    assert (cfg.optim.name, cfg.optim.batch_size, cfg.optim.base_lr,
            cfg.optim.weight_decay) == ("lars", 4096, 0.2, 1.5e-6)
    assert cfg.method.tau_base == 0.996 and cfg.model.projector_hidden == 4096 and cfg.model.projector_out == 256
    assert cfg.augment.blur_prob == (1.0, 0.1) and cfg.augment.solarize_prob == (0.0, 0.2)


def test_overrides_win_and_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 5\n  batch_size: 64\n")
    cfg = load_config(path, ["optim.epochs=7", "augment.blur_prob=[0.5, 0.0]", "data.limit=null",
                             "model.cifar_stem=true"])
    assert cfg.optim.epochs == 7 and cfg.optim.batch_size == 64
    assert cfg.augment.blur_prob == (0.5, 0.0) and cfg.data.limit is None and cfg.model.cifar_stem


def test_augment_preset_fills_unset_fields_only():
    cfg = load_config(None, ["augment.preset=byol32", "augment.size=40"])
    assert cfg.augment.blur_prob == (0.0, 0.0) and cfg.augment.size == 40


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.bach_size=3", "unknown key 'optim.bach_size' (did you mean 'optim.batch_size'?)"),
        ("otpim.epochs=3", "unknown section 'otpim' (did you mean 'optim'?)"),
        ("method.tau_base=1.5", "method.tau_base must be in [0, 1], got 1.5"),
        ("optim.batch_size=0", "optim.batch_size must be >= 2"),
        ("optim.predictor_lr_scale=0", "optim.predictor_lr_scale must be > 0 or auto, got 0"),
        ("optim.batch_size=abc", "optim.batch_size must be an integer, got 'abc'"),
        ("optim.epochs=2.5", "optim.epochs must be an integer"),
        ("model.cifar_stem=maybe", "model.cifar_stem must be true or false"),
        ("augment.blur_prob=0.5", "augment.blur_prob must be a list of 2 numbers"),
        ("model.backbone=resnet19", "model.backbone must be one of"),
        ("data.bad_files=ignore", "data.bad_files must be one of skip, fail"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
        ("epochs=3", "must look like section.key=value"),
    ],
)
def test_errors_are_one_line_and_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "cifar10_resnet18.yaml", ["data.path=/x", "optim.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)
    assert replace(cfg, optim={"epochs": 9}).optim.epochs == 9


@pytest.mark.parametrize("name", ["demo", "cifar10_resnet18", "cifar10_cpu_10min", "imagenet_resnet50_300ep"])
def test_shipped_configs_load(name):
    load_config(CONFIGS / f"{name}.yaml")


def test_imagenet_config_uses_the_official_300_epoch_preset():
    cfg = load_config(CONFIGS / "imagenet_resnet50_300ep.yaml")
    preset = PAPER_SCHEDULES[300]
    assert cfg.optim.epochs == 300 and cfg.optim.batch_size == 4096 and cfg.optim.warmup_epochs == 10
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.method.tau_base) == (
        preset["base_lr"], preset["weight_decay"], preset["tau_base"])
    assert cfg.model.backbone == "resnet50" and cfg.augment.size == 224 and cfg.augment.blur_prob == (1.0, 0.1)


def test_exponents_and_scalar_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-6\ntrain:\n  name: 2024\n")  # YAML 1.1: '1e-6' is text
    cfg = load_config(path, ["optim.base_lr=3e-1"])
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.base_lr == 0.3 and cfg.train.name == "2024"
