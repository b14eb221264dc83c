"""BYOL module, loss and backbones against analytic values (docs/method.md §1-2)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from byol.losses import regression_loss, symmetric_regression_loss
from byol.models import BYOL, EMATarget, MLPHead, OnlineTarget, StopGradTarget, normalized_std, resnet
from byol.models.backbones import SameConv2d, SameMaxPool2d, SameWSConv2d
from byol.models.norms import WSConv2d


def tiny_byol(**kw) -> BYOL:
    torch.manual_seed(0)
    enc = resnet("resnet18", width=0.125, cifar_stem=True)
    projector = MLPHead(enc.feature_dim, 32, 16)
    return BYOL(enc, enc.feature_dim, projector=projector, predictor=MLPHead(16, 32, 16), **kw)


def test_loss_of_known_vectors():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    z = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # 2 - 2cos: aligned 0, opposite 4, cos=0.8 -> 0.4, cos=1/sqrt2 -> 2 - sqrt2
    expected = torch.tensor([0.0, 4.0, 0.4, 2.0 - math.sqrt(2.0)])
    torch.testing.assert_close(regression_loss(p, z), expected)
    # equals the squared distance of the normalised vectors
    dist = (p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1)
    torch.testing.assert_close(regression_loss(p, z), dist)


def test_symmetric_loss_is_the_sum_of_both_directions():
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    z1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # target of view 1
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # target of view 2
    # l(p1, z2) = mean(0, 2) = 1; l(p2, z1) = mean(2, 4) = 3; summed, not averaged: 4
    assert symmetric_regression_loss(p1, p2, z1, z2).item() == pytest.approx(4.0)


def test_forward_loss_matches_manual_computation():
    model = tiny_byol()
    v1, v2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    out = model(v1, v2)
    loss, stats = out.loss, out.stats
    # recompute by hand; BN in train mode uses per-view batch statistics, so per view is exact
    p1 = model.predictor(model.projector(model.encoder(v1)))
    p2 = model.predictor(model.projector(model.encoder(v2)))
    with torch.no_grad():
        t1 = model.target_projector(model.target_encoder(v1))
        t2 = model.target_projector(model.target_encoder(v2))
    manual = regression_loss(p1, t2).mean() + regression_loss(p2, t1).mean()
    torch.testing.assert_close(loss, manual)
    assert set(stats) >= {"loss", "z_std"} and not stats["loss"].requires_grad


def test_no_gradient_reaches_the_target():
    model = tiny_byol()
    loss = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)).loss
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target_parameters())
    online = [*model.encoder.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)


def test_target_initialisation_independent_or_copy():
    indep, copy = tiny_byol(), tiny_byol(target=EMATarget(independent=False))
    same = [torch.equal(a, b) for a, b in zip(indep.online_parameters(), indep.target_parameters())]
    conv_weights_equal = [
        torch.equal(a, b)
        for (n, a), b in zip(indep.encoder.named_parameters(), indep.target_encoder.parameters())
        if "conv" in n
    ]
    assert not any(conv_weights_equal)  # fresh draws for every conv
    assert not all(same)
    assert all(torch.equal(a, b) for a, b in zip(copy.online_parameters(), copy.target_parameters()))


def test_ema_after_n_steps_equals_closed_form():
    model = tiny_byol()
    xi0 = [p.detach().clone() for p in model.target_parameters()]
    theta = [p.detach().clone() for p in model.online_parameters()]
    taus = [0.9, 0.5, 0.99, 0.0, 0.7]
    for tau in taus:
        model.update_target(tau)
    # online fixed: xi_n = prod(tau) xi_0 + (1 - prod(tau)) theta
    prod = math.prod(taus)
    for x0, th, x in zip(xi0, theta, model.target_parameters()):
        torch.testing.assert_close(x, prod * x0 + (1 - prod) * th, rtol=1e-6, atol=1e-6)


def test_ema_with_changing_online_weights_matches_recursion():
    model = tiny_byol()
    xi = [p.detach().clone() for p in model.target_parameters()]
    for step, tau in enumerate([0.99, 0.9, 0.95]):
        with torch.no_grad():
            for p in model.online_parameters():
                p.add_(0.01 * (step + 1))
        model.update_target(tau)
        xi = [tau * x + (1 - tau) * th.detach() for x, th in zip(xi, model.online_parameters())]
    for x, got in zip(xi, model.target_parameters()):
        torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_ema_leaves_batchnorm_buffers_alone():
    model = tiny_byol()
    model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    before = {k: v.clone() for k, v in model.target_encoder.state_dict().items() if "running" in k}
    model.update_target(0.0)
    after = {k: v for k, v in model.target_encoder.state_dict().items() if "running" in k}
    online = {k: v for k, v in model.encoder.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(after[k], online[k]) for k in after)


def test_update_target_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        tiny_byol().update_target(1.5)


def test_target_sees_each_view_separately():
    """The default runs BN per view; concat_views mixes both views' statistics."""
    torch.manual_seed(1)
    v1, v2 = torch.randn(4, 3, 16, 16), 3 + torch.randn(4, 3, 16, 16)
    sep, cat = tiny_byol(), tiny_byol(concat_views=True)
    cat.load_state_dict(sep.state_dict())
    l_sep = sep(v1, v2).loss
    l_cat = cat(v1, v2).loss
    assert not torch.allclose(l_sep, l_cat)


def test_simsiam_and_no_stopgrad_variants_have_no_target_network():
    for target in (StopGradTarget(), OnlineTarget()):
        model = tiny_byol(target=target)
        assert model.target_parameters() == []
        loss = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)).loss
        loss.backward()
        model.update_target(0.5)  # a no-op, not an error


def test_heads_shapes_and_layers():
    head = MLPHead(2048, 4096, 256)
    assert head(torch.randn(3, 2048)).shape == (3, 256)
    linear1, norm, _, linear2 = head.net
    assert isinstance(norm, nn.BatchNorm1d) and linear1.bias is not None and linear2.bias is None
    with pytest.raises(ValueError, match="norm"):
        MLPHead(8, 8, 8, norm="batch")


@pytest.mark.parametrize(
    "name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)]
)
def test_backbones_match_torchvision(name, dim):
    ours = resnet(name)
    tv = getattr(torchvision.models, name)()
    tv.fc = nn.Identity()
    assert ours.feature_dim == dim
    ours.load_state_dict(tv.state_dict())  # same names and shapes
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), tv.eval()
    torch.testing.assert_close(ours(x), tv(x))


def test_width_multiplier_and_cifar_stem():
    wide = resnet("resnet50", width=2, cifar_stem=True)
    assert wide.feature_dim == 4096 and wide.conv1.kernel_size == (3, 3) and wide.conv1.stride == (1, 1)
    assert isinstance(wide.maxpool, nn.Identity)
    assert wide(torch.randn(2, 3, 32, 32)).shape == (2, 4096)
    assert resnet("resnet200").layer3.__len__() == 36
    with pytest.raises(ValueError, match="model.backbone"):
        resnet("resnet19")


def test_any_user_backbone_works():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = BYOL(backbone, 8, projector=MLPHead(8, 16, 8), predictor=MLPHead(8, 16, 8))
    loss = model(torch.randn(4, 3, 12, 12), torch.randn(4, 3, 12, 12)).loss
    loss.backward()
    assert not torch.equal(model.encoder[0].weight, model.target_encoder[0].weight)


def test_normalized_std_detects_collapse():
    torch.manual_seed(0)
    healthy = normalized_std(torch.randn(512, 64))
    collapsed = normalized_std(torch.ones(512, 64) + 1e-4 * torch.randn(512, 64))
    assert 0.9 < healthy < 1.1 and collapsed < 0.01


# --- padding="same": TensorFlow's "SAME", what the released weights were trained with -----------

def _tf_same(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's rule, written out: out = ceil(n / s), the extra pixel at the bottom/right."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("k,s", [(7, 2), (3, 2), (1, 2), (3, 1)])
def test_same_conv_and_pool_pad_as_tensorflow(k, s):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, k, stride=s, bias=False)
    pool = SameMaxPool2d(3, stride=2)
    for n in range(5, 13):  # odd and even: the pads change with the parity of the input
        x = torch.randn(1, 2, n, n + 1)
        (top, bottom), (left, right) = _tf_same(n, k, s), _tf_same(n + 1, k, s)
        expected = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, stride=s)
        torch.testing.assert_close(conv(x), expected)
        assert conv(x).shape[-2:] == (-(-n // s), -(-(n + 1) // s))
        (top, bottom), (left, right) = _tf_same(n, 3, 2), _tf_same(n + 1, 3, 2)
        padded = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        torch.testing.assert_close(pool(x), F.max_pool2d(padded, 3, 2))
    assert _tf_same(8, 3, 2) == (0, 1) and _tf_same(224, 7, 2) == (2, 3)  # the asymmetric cases


def test_same_padding_changes_numerics_not_names():
    torch.manual_seed(0)
    sym, same = resnet("resnet50", width=0.25), resnet("resnet50", width=0.25, padding="same")
    assert sym.padding == "symmetric" and same.padding == "same"
    assert {k: v.shape for k, v in sym.state_dict().items()} == {k: v.shape for k, v in same.state_dict().items()}
    same.load_state_dict(sym.state_dict())
    # symmetric is exactly as before: torchvision's own layers; same converts only the strided ones
    assert not any(isinstance(m, (SameConv2d, SameMaxPool2d)) for m in sym.modules())
    converted = {n for n, m in same.named_modules() if isinstance(m, (SameConv2d, SameMaxPool2d))}
    assert {"conv1", "maxpool", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"} <= converted
    assert all(m.stride != (1, 1) or n == "maxpool" for n, m in same.named_modules() if n in converted)
    x = torch.randn(2, 3, 64, 64)
    sym.eval(), same.eval()
    with torch.no_grad():
        a, b = sym(x), same(x)
    assert a.shape == b.shape and not torch.allclose(a, b, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="model.padding"):
        resnet("resnet18", padding="valid")


def test_same_padding_with_channels_last_bf16_and_gn_ws():
    torch.manual_seed(0)
    net = resnet("resnet18", width=0.25, padding="same").eval()
    x = torch.randn(2, 3, 45, 45)
    with torch.no_grad():
        ref = net(x)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = net(x)
    assert bf.dtype == torch.bfloat16 and (bf.float() - ref).abs().max() < 0.05 * ref.abs().max()
    ws = resnet("resnet18", width=0.25, norm="gn_ws", padding="same")
    assert isinstance(ws.conv1, SameWSConv2d) and isinstance(ws.layer1[0].conv1, WSConv2d)
    assert ws(x).shape == (2, 128)


@pytest.mark.parametrize("backbone, dim", [("timm/test_vit", 64), ("timm/mobilenetv3_small_050", 1024),
                                           ("torchvision/regnet_y_400mf", 440), ("torchvision/vit_b_16", 768)])
def test_named_backbones_are_headless_with_their_feature_dim(backbone, dim):
    """The classifier is gone ([B, 3, H, W] -> [B, D]); D is read from the model; transformers get
    augment.size as their image size; the EMA target is a separate copy of the named encoder."""
    from byol.config import load_config
    from byol.models.build import build_model

    cfg = load_config(None, [f"model.backbone={backbone}", "augment.preset=byol32", "augment.size=32",
                             "model.projector_hidden=16", "model.projector_out=8", "model.predictor_hidden=16"])
    model = build_model(cfg).eval()
    assert model.feature_dim == model.encoder.feature_dim == dim
    assert model.encoder.byol_backbone == backbone
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.encoder.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.encoder(x).shape == (2, dim) and model.target_encoder(x).shape == (2, dim)
    assert model.target_encoder is not model.encoder
