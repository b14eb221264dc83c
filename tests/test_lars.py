"""LARS against the naive per-parameter formula of docs/method.md §4, and the exclusion filter."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import nn

from byol.models.norms import Affine
from byol.optim import LARS, build_optimizer, excluded_from_decay_and_adaptation, param_groups

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 1e-2, 1e-3


def small_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 3),
    ).to(dtype)


def set_grads(model: nn.Module, seed: int) -> None:
    """Real gradients of a fixed loss; the same seed gives the same grads for equal weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(7, 5, generator=gen).to(dtype)
    model.zero_grad(set_to_none=True)
    (model(x) ** 2).sum().backward()


def naive_lars_step(params_adapt, bufs, lr=LR, momentum=MOMENTUM, eta=ETA):
    """docs/method.md §4 written out one parameter at a time, in plain Python.

    ``params_adapt`` is a list of (param, weight_decay, adapt); ``bufs`` maps id -> trace (0 first).
    """
    with torch.no_grad():
        for p, wd, adapt in params_adapt:
            g = p.grad + wd * p
            if adapt:
                w_norm, g_norm = p.norm().item(), g.norm().item()
                factor = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                g = g * factor
            m = momentum * bufs.get(id(p), 0.0) + g
            bufs[id(p)] = m
            p -= lr * m


def naive_spec(model: nn.Module, grouped: bool):
    excluded = excluded_from_decay_and_adaptation(model) if grouped else set()
    return [(p, 0.0 if n in excluded else WD, n not in excluded) for n, p in model.named_parameters()]


@pytest.mark.parametrize("grouped", [True, False], ids=["exclusion_groups", "all_adapted"])
@pytest.mark.parametrize("steps", [1, 3])
def test_lars_matches_naive_formula(grouped, steps):
    model = small_model()
    reference = copy.deepcopy(model)
    params = param_groups(model, WD) if grouped else model.parameters()
    opt = LARS(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    spec, bufs = naive_spec(reference, grouped), {}
    for step in range(steps):
        set_grads(model, seed=step)
        set_grads(reference, seed=step)
        opt.step()
        naive_lars_step(spec, bufs)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    # The trace starts at 0, so after one step the buffer is the first (decayed, scaled) gradient.
    if steps == 1:
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[id(q)])


def test_the_trust_ratio_and_decay_change_the_step():
    """Guard against a naive reference that is trivially equal to the optimizer."""
    model = small_model()
    set_grads(model, seed=0)
    w = model[0].weight
    before, grad = w.detach().clone(), w.grad.clone()
    LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA).step()
    g = grad + WD * before
    expected = before - LR * (ETA * before.norm() / g.norm()) * g
    torch.testing.assert_close(w.detach(), expected)
    assert not torch.allclose(w.detach(), before - LR * grad)


def test_zero_norms_give_factor_one():
    lin = nn.Linear(4, 3, bias=False).double()
    nn.init.zeros_(lin.weight)  # ||w|| = 0: the trust ratio would be 0 and the weight would never move
    lin.weight.grad = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    opt = LARS(lin.parameters(), lr=0.1, weight_decay=WD)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), -0.1 * torch.arange(12.0, dtype=torch.float64).reshape(3, 4))

    # ||g|| = 0 (and no decay): no NaN, no movement.
    other = nn.Linear(4, 3, bias=False).double()
    before = other.weight.detach().clone()
    other.weight.grad = torch.zeros_like(other.weight)
    LARS(other.parameters(), lr=0.1).step()
    torch.testing.assert_close(other.weight.detach(), before)


def test_excluded_params_get_no_decay_and_no_trust_ratio():
    model = small_model()
    set_grads(model, seed=3)
    excluded = excluded_from_decay_and_adaptation(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    LARS(param_groups(model, WD), lr=LR, weight_decay=WD).step()
    for name, p in model.named_parameters():
        plain_sgd = before[name] - LR * grads[name]
        if name in excluded:
            torch.testing.assert_close(p.detach(), plain_sgd, msg=name)
        else:
            assert not torch.allclose(p.detach(), plain_sgd), name


def test_grad_none_is_skipped_and_grad_untouched():
    model = small_model()
    set_grads(model, seed=0)
    model[5].weight.grad = None
    frozen = model[5].weight.detach().clone()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt = LARS(model.parameters(), lr=LR, weight_decay=WD)
    opt.step()
    assert model[5].weight not in opt.state
    torch.testing.assert_close(model[5].weight.detach(), frozen)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, g)


def test_closure_is_called_and_its_loss_returned():
    model = small_model()
    opt = LARS(model.parameters(), lr=LR)

    def closure():
        opt.zero_grad()
        loss = (model(torch.ones(4, 5, dtype=torch.float64)) ** 2).sum()
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))


def test_state_dict_round_trip_gives_identical_steps():
    model = small_model()
    opt = LARS(param_groups(model, WD), lr=LR, weight_decay=WD)
    for step in range(2):
        set_grads(model, seed=step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    restored = small_model()
    restored.load_state_dict(saved["model"])
    restored_opt = LARS(param_groups(restored, WD), lr=LR, weight_decay=WD)
    restored_opt.load_state_dict(saved["opt"])
    assert [g["lars_adapt"] for g in restored_opt.param_groups] == [True, False]
    for step in range(2, 4):
        set_grads(model, seed=step)
        set_grads(restored, seed=step)
        opt.step()
        restored_opt.step()
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -0.1}, "LARS: lr must be >= 0, got -0.1"),
    ({"momentum": 1.5}, "LARS: momentum must be in [0, 1), got 1.5"),
    ({"momentum": 1.0}, "LARS: momentum must be in [0, 1), got 1.0"),
    ({"weight_decay": -1e-6}, "LARS: weight_decay must be >= 0, got -1e-06"),
    ({"trust_coefficient": 0.0}, "LARS: trust_coefficient must be > 0, got 0.0"),
])
def test_constructor_validation(kwargs, message):
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError) as err:
        LARS(nn.Linear(2, 2).parameters(), **args)
    assert str(err.value) == message


def test_group_values_are_validated_too():
    with pytest.raises(ValueError, match="momentum"):
        LARS([{"params": nn.Linear(2, 2).parameters(), "momentum": -0.5}], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_step(dtype):
    model = small_model(torch.float64)
    reference = copy.deepcopy(model)
    low = copy.deepcopy(model).to(dtype)
    opt = LARS(param_groups(low, WD), lr=LR, weight_decay=WD)
    set_grads(reference, seed=0)
    for p, q in zip(low.parameters(), reference.parameters()):
        p.grad = q.grad.to(dtype)
    naive_lars_step(naive_spec(reference, grouped=True), {})
    opt.step()
    for p, q in zip(low.parameters(), reference.parameters()):
        assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(p.double(), q, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    cpu = small_model(dtype)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [LARS(param_groups(m, WD), lr=LR, weight_decay=WD) for m in (cpu, gpu)]
    for step in range(3):
        set_grads(cpu, seed=step)
        for p, q in zip(gpu.parameters(), cpu.parameters()):
            p.grad = q.grad.cuda()
        for opt in opts:
            opt.step()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for p, q in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=tol, atol=tol)


# --- the exclusion filter ---------------------------------------------------

def test_exclusion_on_resnet50():
    model = torchvision.models.resnet50()
    excluded = excluded_from_decay_and_adaptation(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53
    assert len(excluded) == 53 * 2 + 1  # BN weight and bias, plus fc.bias (convs have no bias)
    assert excluded == {f"{n}.{k}" for n in bns for k in ("weight", "bias")} | {"fc.bias"}
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert not weights & excluded
    assert weights | excluded == {n for n, _ in model.named_parameters()}  # nothing else exists


class _WithOwnBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.bias = nn.Parameter(torch.zeros(3))


def test_exclusion_covers_every_norm_kind_and_bias():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),                       # weight kept, bias excluded
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.LocalResponseNorm(2),                  # no parameters
        nn.Linear(4, 4, bias=False),              # weight kept
        nn.LayerNorm(4),
        nn.RMSNorm(4),
        _WithOwnBias(),                           # "scale" (1-D) and "bias" excluded
        Affine(4),                                # a BN layer after the BN-free init
    )
    assert excluded_from_decay_and_adaptation(model) == {
        "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias",
        "4.weight", "4.bias", "7.weight", "7.bias", "8.weight", "9.scale", "9.bias", "10.weight", "10.bias",
    }


def test_param_groups_split_and_skip_frozen():
    model = small_model()
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, WD)
    assert [(g["weight_decay"], g["lars_adapt"]) for g in groups] == [(WD, True), (0.0, False)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in ids[0]} == {"3.weight", "5.weight"}
    assert {names[i] for i in ids[1]} == {"0.bias", "1.weight", "1.bias", "4.weight", "4.bias", "5.bias"}


def test_param_groups_omit_an_empty_group():
    groups = param_groups(nn.Linear(3, 3, bias=False), WD)
    assert len(groups) == 1 and groups[0]["lars_adapt"] is True


# --- build_optimizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    model = small_model()
    opt = build_optimizer(name, model, lr=0.1, weight_decay=WD)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    if name != "lars":
        assert all("lars_adapt" not in g and g["foreach"] for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    set_grads(model, seed=0)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError) as err:
        build_optimizer("adam", small_model(), lr=0.1, weight_decay=0.0)
    assert str(err.value) == "optim.name: unknown optimizer 'adam' (choose from lars, sgd, adamw)"


# --- the predictor's lr multiple (optim.predictor_lr_scale) -------------------------------------

class _WithPredictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = small_model()
        self.predictor = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()

    def forward(self, x):
        return self.predictor(self.encoder(x))


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_predictor_lr_scale_gives_the_predictor_its_own_lr(name):
    from byol.train.step import set_lr

    model = _WithPredictor()
    opt = build_optimizer(name, model, lr=0.0, weight_decay=WD, predictor_lr_scale=10.0)
    set_lr(opt, 0.02)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        decayed = p.ndim > 1
        want_lr = 0.2 if n.startswith("predictor.") else 0.02
        assert lr_of[id(p)] == (pytest.approx(want_lr), WD if decayed else 0.0), n
    # a first step is linear in the lr for all three: the predictor moves exactly 10x as far
    ref = _WithPredictor()
    ref_opt = build_optimizer(name, ref, lr=0.0, weight_decay=WD)
    set_lr(ref_opt, 0.02)
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1)).double()
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        (m(x) ** 2).sum().backward()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        o.step()
        m.delta = {n: p.detach() - before[n] for n, p in m.named_parameters()}
    for n in model.delta:
        scale = 10.0 if n.startswith("predictor.") else 1.0
        assert ref.delta[n].abs().max() > 0, n
        torch.testing.assert_close(model.delta[n], scale * ref.delta[n])


def test_predictor_lr_scale_one_keeps_the_two_groups():
    model = _WithPredictor()
    groups = build_optimizer("lars", model, lr=0.1, weight_decay=WD, predictor_lr_scale=1.0).param_groups
    assert [(g["weight_decay"], g["lars_adapt"]) for g in groups] == [(WD, True), (0.0, False)]
    assert all("lr_scale" not in g for g in groups)


def test_a_run_builds_its_optimizer_with_the_configs_predictor_lr_scale():
    from byol.config import load_config
    from byol.train.setup import build_model_and_optimizer
    from conftest import TINY

    model, opt = build_model_and_optimizer(load_config(None, [*TINY, "optim.predictor_lr_scale=10"]),
                                           torch.device("cpu"))
    scaled = {id(p) for g in opt.param_groups if g.get("lr_scale") == 10.0 for p in g["params"]}
    assert scaled == {id(p) for p in model.predictor.parameters()}
