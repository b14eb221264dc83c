"""Normalisation variants (docs/method.md §8): GroupNorm + weight standardisation, the BN-free
data-dependent init, and their runs (train, checkpoint, resume, export)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from byol.config import load_config
from byol.config.sections import ConfigError
from byol.export import export_encoder, load_encoder
from byol.models.backbones import resnet
from byol.models.build import bn_free_init, build_model
from byol.models.norms import Affine, WSConv2d, groups_for, remove_batchnorm
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY


def test_ws_conv_standardises_each_output_channel():
    torch.manual_seed(0)
    conv = WSConv2d(5, 7, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.randn(7, 1, 1, 1))  # far from standardised
    w = conv.standardized_weight()
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(7), atol=1e-5)
    assert torch.allclose(w.std(dim=(1, 2, 3), unbiased=False), torch.ones(7), atol=1e-3)
    x = torch.randn(2, 5, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, w, padding=1), atol=1e-5)
    assert not torch.allclose(conv(x), F.conv2d(x, conv.weight, padding=1), atol=1e-2)


def test_gn_ws_resnet_has_no_batch_statistics():
    torch.manual_seed(0)
    net = resnet("resnet18", width=0.125, cifar_stem=True, norm="gn_ws")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is WSConv2d for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in gns) and groups_for(64) == 32
    # same parameter names as the BN network (minus BN's running statistics)
    bn_names = {k for k in resnet("resnet18", width=0.125, cifar_stem=True).state_dict()
                if "running" not in k and "num_batches" not in k}
    assert set(net.state_dict()) == bn_names
    x = torch.randn(6, 3, 16, 16)
    net.train()
    assert torch.allclose(net(x)[:1], net(x[:1]), atol=1e-5)  # a sample's output ignores the batch


def test_bn_free_init_reproduces_the_bn_network_on_the_calibration_batch():
    torch.manual_seed(0)
    net = resnet("resnet18", width=0.125, cifar_stem=True, zero_init_residual=True).train()
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        expected = copy.deepcopy(net)(x)  # train mode: batch statistics
        remove_batchnorm(net, lambda: net(x))
        got = net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # gamma_0 = 0 for the last norm of each residual block, 1/sigma (> 0) elsewhere
    assert all(torch.all(b.bn2.weight == 0) for stage in (net.layer1, net.layer2) for b in stage)
    assert torch.all(net.bn1.weight > 0) and isinstance(net.bn1, Affine)
    # no batch statistics any more: one sample alone gives what it gives in the batch
    with torch.no_grad():
        assert torch.allclose(net(x[:1]), got[:1], atol=1e-5)


def test_bn_free_init_of_the_whole_model_heads_and_target_included():
    cfg = load_config(None, [*TINY, "model.bn_free_init=true"])
    torch.manual_seed(0)
    model = build_model(cfg, keep_bn=True).train()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = copy.deepcopy(model)
        want = (ref.predictor(ref.projector(ref.encoder(x))), ref.target_projector(ref.target_encoder(x)))
        bn_free_init(model, x)
        got = (model.predictor(model.projector(model.encoder(x))), model.target_projector(model.target_encoder(x)))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # the structure a checkpoint is loaded into has the same names and shapes
    plain = build_model(cfg)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # model.bn_free_heads=false: the encoders lose their BN, the heads keep theirs
    enc_only = load_config(None, [*TINY, "model.bn_free_init=true", "model.bn_free_heads=false"])
    torch.manual_seed(0)
    model = build_model(enc_only, keep_bn=True).train()
    with torch.no_grad():
        want = copy.deepcopy(model).encoder(x)
        bn_free_init(model, x, heads=False)
        assert torch.allclose(model.encoder(x), want, atol=1e-4, rtol=1e-4)
    for part, has_bn in (("encoder", False), ("target_encoder", False), ("projector", True), ("predictor", True)):
        assert any(isinstance(m, nn.BatchNorm1d) for m in getattr(model, part).modules()) == has_bn, part
        assert any(isinstance(m, nn.BatchNorm2d) for m in getattr(model, part).modules()) is False, part
    assert {k: v.shape for k, v in build_model(enc_only).state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm", ["model.backbone_norm=gn_ws", "model.bn_free_init=true",
                                  "model.backbone_norm=none"])
def test_norm_variant_trains_resumes_and_exports(tmp_path, norm):
    def cfg(run, *extra):
        return load_config(None, [*TINY, norm, "data.dataset=shapes", "data.shapes_size=48",
                                  "data.val_fraction=0", f"train.out_dir={tmp_path}", f"train.name={run}",
                                  *extra])
    full = pretrain(cfg("full"))
    part = pretrain(cfg("split", "train.max_steps=5"))
    done = pretrain(cfg("split"), resume=part.run_dir)
    a, b = (load_checkpoint(find_checkpoint(r.run_dir))["model"] for r in (full, done))
    assert full.finished and all(torch.equal(a[k], b[k]) for k in a)
    stats = [k for k in a if "running_mean" in k]  # batch statistics left in the network
    assert not stats if "bn_free" in norm else stats and not any("encoder" in k for k in stats)
    out = tmp_path / "enc.safetensors"
    meta = export_encoder(full.run_dir, out)
    enc = load_encoder(out)
    assert meta["norm"] == {"model.backbone_norm=gn_ws": "gn_ws", "model.bn_free_init=true": "affine",
                            "model.backbone_norm=none": "none"}[norm]
    x = torch.randn(2, 3, 16, 16)
    model = build_model(cfg("full"))
    model.load_state_dict(a)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.encoder.eval()(x), atol=1e-5)


def test_backbone_norm_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.backbone_norm must be one of bn, gn_ws, none"):
        load_config(None, ["model.backbone_norm=layer"])
    with pytest.raises(ConfigError, match="model.backbone_norm must be bn with model.bn_free_init=true"):
        load_config(None, ["model.backbone_norm=gn_ws", "model.bn_free_init=true"])
