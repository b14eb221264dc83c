"""The generalized InfoNCE of docs/method.md §7: BYOL at beta = 0, SimCLR's NT-Xent at beta = 1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from byol.config import load_config
from byol.config.sections import ConfigError
from byol.losses import InfoNCELoss, symmetric_infonce_loss, symmetric_regression_loss
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY, tiny_byol


def _pair(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(4)]


def test_beta_zero_is_the_byol_loss_with_the_same_gradients():
    p1, p2, z1, z2 = (x.requires_grad_() for x in _pair())
    a = symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.3, beta=0.0)
    b = symmetric_regression_loss(p1, p2, z1, z2)
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a, (p1, p2))
    gb = torch.autograd.grad(b, (p1, p2))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def _nt_xent_by_hand(z1, z2, t):
    """SimCLR's NT-Xent, written out anchor by anchor: 2B anchors, 2B - 1 candidates each."""
    z = [F.normalize(x, dim=0) for x in torch.cat((z1, z2))]
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / den)
    return total / n


def test_beta_one_without_predictor_or_target_is_nt_xent():
    _, _, z1, z2 = _pair(b=4, d=3, seed=1)
    t = 0.5
    ours = symmetric_infonce_loss(z1, z2, z1, z2, alpha=t, beta=1.0)  # phi = psi = online projection
    assert float(ours) == pytest.approx(4 + 4 * t * _nt_xent_by_hand(z1, z2, t), rel=1e-6)  # float32


def test_beta_weighs_the_negatives_linearly_and_is_validated():
    p1, p2, z1, z2 = _pair(seed=2)
    loss = [float(symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.2, beta=b)) for b in (0.0, 0.5, 1.0)]
    assert loss[1] == pytest.approx((loss[0] + loss[2]) / 2, rel=1e-6)
    assert loss[2] > loss[0]  # the log-sum-exp over negatives adds a positive amount here
    with pytest.raises(ValueError, match="beta"):
        symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.2, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.0, beta=0.5)
    for bad in ("method.loss=contrastive", "method.beta=2", "method.alpha=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_model_with_infonce_at_beta_zero_trains_exactly_like_byol():
    v1, v2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    a = tiny_byol()(v1, v2).loss
    b = tiny_byol(loss=InfoNCELoss(alpha=0.1, beta=0.0))(v1, v2).loss
    c = tiny_byol(loss=InfoNCELoss(alpha=0.1, beta=1.0))(v1, v2).loss
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0",
                              "method.predictor=false", "method.target=online", "method.loss=infonce",
                              "method.beta=1.0", "method.alpha=0.5", f"train.out_dir={tmp_path}",
                              f"train.name={name}", *extra])


def test_simclr_combination_trains_checkpoints_and_resumes_exactly(tmp_path):
    full = pretrain(_cfg(tmp_path, "full"))
    part = pretrain(_cfg(tmp_path, "split", "train.max_steps=5"))
    done = pretrain(_cfg(tmp_path, "split"), resume=part.run_dir)
    assert full.finished and done.finished and part.step == 5
    a = load_checkpoint(find_checkpoint(full.run_dir))["model"]
    b = load_checkpoint(find_checkpoint(done.run_dir))["model"]
    assert not any(k.startswith("target_") or k.startswith("predictor.") for k in a)  # no target, no q
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logits_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(16, 32) for _ in range(4))
    queue, valid = torch.randn(64, 32), torch.ones(64, dtype=torch.bool)
    for extra in ({}, {"queue": queue, "queue_valid": valid}):
        exact = symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.1, beta=1.0, **extra)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = symmetric_infonce_loss(p1, p2, z1, z2, alpha=0.1, beta=1.0, **extra)
        assert mixed.dtype == torch.float32
        assert torch.allclose(mixed, exact, atol=1e-5), (mixed, exact)
