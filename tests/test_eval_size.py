"""augment.eval_size: train on small crops, evaluate (kNN, probes, embed, export) at another size."""
from __future__ import annotations

import pytest
import torch

from byol.config import ConfigError, load_config
from byol.data.transforms import make_eval_transform, make_views
from byol.export import export_encoder
from byol.train.pretrain import pretrain
from conftest import TINY, write_shapes_folder


def test_the_eval_transform_takes_eval_size_and_the_views_keep_size():
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    aug = load_config(None, [*TINY, "augment.eval_size=24"]).augment
    assert aug.size == 16 and aug.eval_px == 24
    assert make_eval_transform(aug)(img).shape == (3, 24, 24)
    assert all(v.shape == (3, 16, 16) for v in make_views(aug)(img))
    plain = load_config(None, TINY).augment  # unset: evaluation at the training size
    assert plain.eval_size is None and plain.eval_px == 16
    assert make_eval_transform(plain)(img).shape == (3, 16, 16)


@pytest.mark.parametrize("override, message", [
    ("augment.eval_size=4", "augment.eval_size must be >= 8 or null, got 4"),
    ("model.backbone=timm/vit_tiny_patch16_224 model.width=1 model.cifar_stem=false",
     "augment.eval_size=24 needs a convolutional backbone; timm/vit_tiny_patch16_224 takes one image size"),
])
def test_bad_eval_sizes_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*TINY, "augment.eval_size=24", *override.split()])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_transformer_may_name_its_own_size_as_eval_size():
    cfg = load_config(None, [*TINY, "augment.eval_size=16", "model.backbone=timm/vit_tiny_patch16_224",
                             "model.width=1", "model.cifar_stem=false"])
    assert cfg.augment.eval_px == 16


def test_a_run_evaluates_and_exports_at_eval_size(tmp_path, capsys):
    folder = write_shapes_folder(tmp_path / "photos", n=40, classes=2, size=24)
    cfg = load_config(None, [*TINY, f"data.path={folder}", "data.val_fraction=0.25", "augment.eval_size=24",
                             "optim.epochs=1", f"train.out_dir={tmp_path}", "train.name=r"])
    result = pretrain(cfg)
    out = capsys.readouterr().out
    assert "16 px, evaluated at 24 px" in out
    assert (result.run_dir / "eval" / "knn.json").is_file()  # the final kNN ran on 24-px images
    info = export_encoder(result.run_dir, tmp_path / "enc.safetensors")
    assert info["image_size"] == 24  # a deployed encoder is fed what it was evaluated on


def test_a_named_backbone_that_takes_one_size_fails_before_training():
    from byol.train.setup import build_model_and_optimizer

    named = ["model.width=1", "model.cifar_stem=false", "augment.eval_size=32"]
    # pit (a pooling transformer, not in the transformer name list) trains at 24 px but not 32
    cfg = load_config(None, [*TINY, "augment.size=24", "model.backbone=timm/pit_ti_224", *named])
    with pytest.raises(ConfigError) as err:
        build_model_and_optimizer(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert msg.startswith("config: augment.eval_size=32: timm/pit_ti_224 does not take 32-px images (")
    assert "\n" not in msg
    # a convnet takes any size: built, in training mode, its weights as drawn
    cfg = load_config(None, [*TINY, "augment.size=24", "model.backbone=torchvision/resnet18", *named])
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(cfg, torch.device("cpu"))
    assert model.encoder.training
