"""Schedules, LARS, target EMA and loss against DeepMind's released BYOL code (docs/fidelity.md).

The reference values in tests/fixtures/official/optim.npz were computed by running the release
(tools/official_reference/make_optim_fixtures.py, in a development-only jax environment); here only
numpy and torch are needed. The release's parameters are haiku trees; ``Tiny`` is the same set of
tensors as a torch module (module names kept, ``w``/``b``/``scale``/``offset`` -> ``weight``/``bias``,
conv HWIO -> OIHW, linear (in, out) -> (out, in)), so that our LARS filter sees real torch layers.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from byol.losses import RegressionLoss, regression_loss, symmetric_regression_loss
from byol.models.targets import EMATarget
from byol.optim import build_optimizer, cosine_tau, excluded_from_decay_and_adaptation, scaled_lr, warmup_cosine_lr
from byol.train.step import set_lr

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "optim.npz"
HPARAMS = ("batch", "base_lr", "total", "warmup", "tau_base", "weight_decay", "eta", "momentum")
STEPS = 5


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


# -- schedules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", [0, 1, 2])
def test_lr_schedule_matches_release(ref, i):
    """Warm-up then cosine at every recorded step, against the release's float32 values (the 1000-epoch
    ImageNet schedule, a short one and one without warm-up) and its float64 cosine part."""
    batch, base, total, warmup = ref[f"lr{i}.setting"]
    batch, total, warmup = int(batch), int(total), int(warmup)
    steps = ref[f"lr{i}.steps"]
    peak = scaled_lr(base, batch)
    ours = np.array([warmup_cosine_lr(int(k), total, warmup, peak) for k in steps])
    # float32 arithmetic in the release: relative 1e-6, plus an absolute 2e-7 * peak where the cosine
    # nears zero at the end of a long schedule (its argument pi k / K carries float32 rounding).
    np.testing.assert_allclose(ours, ref[f"lr{i}.f32"], rtol=1e-6, atol=2e-7 * peak)
    after = steps >= warmup
    np.testing.assert_allclose(ours[after], ref[f"lr{i}.cos64"], rtol=1e-9, atol=1e-15 * peak)
    np.testing.assert_allclose(ours[steps < warmup], ref[f"lr{i}.f32"][steps < warmup], rtol=1e-6, atol=0)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_tau_schedule_matches_release(ref, i):
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 at every recorded step, K and beyond included."""
    base, total = ref[f"tau{i}.setting"]
    steps = ref[f"tau{i}.steps"]
    ours = np.array([cosine_tau(int(k), int(total), float(base)) for k in steps])
    np.testing.assert_allclose(ours, ref[f"tau{i}.f64"], rtol=1e-14, atol=0)
    np.testing.assert_allclose(ours, ref[f"tau{i}.f32"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("run", ["paper", "strong"])
def test_step_schedules_match_release_update(ref, run):
    """The lr and tau that the release's update step used at steps 0..4 are what our Plan gives there."""
    h = dict(zip(HPARAMS, ref[f"lars.{run}.hparams"]))
    total, warmup = int(h["total"]), int(h["warmup"])
    lr = [warmup_cosine_lr(k, total, warmup, scaled_lr(h["base_lr"], int(h["batch"]))) for k in range(STEPS)]
    tau = [cosine_tau(k, total, h["tau_base"]) for k in range(STEPS)]
    for tag in ("f32", "f64"):
        np.testing.assert_allclose(lr, ref[f"lars.{run}.{tag}.lr"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(tau, ref[f"lars.{run}.{tag}.tau"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(tau, ref[f"lars.{run}.f64.tau"], rtol=1e-14, atol=0)
    if warmup > 0:  # the first step (step 0) of a warm-up has lr 0 in both: it does not move the weights
        assert lr[0] == ref[f"lars.{run}.f32.lr"][0] == ref[f"lars.{run}.f64.lr"][0] == 0.0


# -- loss -------------------------------------------------------------------------------------------

CASES = ["gauss", "scaled", "aligned"]


def _vectors(ref, case):
    return [torch.from_numpy(ref[f"loss.{case}.{k}"]).clone() for k in ("p1", "p2", "z1", "z2")]


@pytest.mark.parametrize("case", CASES)
def test_regression_loss_per_pair_matches_release(ref, case):
    """||p/||p|| - z/||z|| ||^2 per sample, both directions, on random, rescaled and nearly aligned rows."""
    p1, p2, z1, z2 = _vectors(ref, case)
    # Our 2 - 2 cos and the release's squared difference of unit vectors agree to float32 rounding of
    # terms of size 2: an absolute 1e-6 (the nearly aligned case has losses of about 1e-3).
    np.testing.assert_allclose(regression_loss(p1, z2).numpy(), ref[f"loss.{case}.l12"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(regression_loss(p2, z1).numpy(), ref[f"loss.{case}.l21"], rtol=1e-5, atol=1e-6)


TINY_ROWS = {"zero p": 0, "|p| ~ 1e-8": 1, "|p| ~ 1e-7": 2, "zero z": 5}


def test_regression_loss_small_rows_match_release(ref):
    """Rows with norm 1e-5 (rows 3, 4: one scaled down, one ordinary) still give the release's loss."""
    got = regression_loss(torch.from_numpy(ref["loss.tiny.p"]), torch.from_numpy(ref["loss.tiny.z"])).numpy()
    np.testing.assert_allclose(got[3:5], ref["loss.tiny.l"][3:5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row", list(TINY_ROWS))
def test_regression_loss_degenerate_rows_differ_from_release_as_documented(ref, row):
    """A known, documented difference (docs/fidelity.md) for rows of norm below 1e-6, which training never
    produces: the release divides by max(||x||^2, 1e-12)^(1/2) and takes ||x/n - y/n'||^2 (a zero row gives 1);
    we divide by max(||x||, 1e-12) and take 2 - 2 cos (a zero row gives 2). Pins both sides of it."""
    i = TINY_ROWS[row]
    p, z = torch.from_numpy(ref["loss.tiny.p"][i:i + 1]), torch.from_numpy(ref["loss.tiny.z"][i:i + 1])
    got = regression_loss(p, z)
    ours = 2 - 2 * (torch.nn.functional.normalize(p, dim=-1, eps=1e-12)
                    * torch.nn.functional.normalize(z, dim=-1, eps=1e-12)).sum(-1)
    torch.testing.assert_close(got, ours)
    assert not np.allclose(got.numpy(), ref["loss.tiny.l"][i:i + 1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_symmetric_loss_and_gradient_match_release(ref, case):
    """The release's loss_fn representation loss (both directions summed, batch mean) and its gradient
    with respect to the two predictions, against our loss and autograd."""
    p1, p2, z1, z2 = _vectors(ref, case)
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    loss = symmetric_regression_loss(p1, p2, z1, z2)
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref[f"loss.{case}.repr_loss"], rtol=1e-6, atol=1e-7)
    assert RegressionLoss()(p1, p2, z1, z2).item() == loss.item()
    for g, key in ((p1.grad, "grad_p1"), (p2.grad, "grad_p2")):
        want = ref[f"loss.{case}.{key}"]
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# -- LARS and the target EMA ------------------------------------------------------------------------

class Tiny(nn.Module):
    """The fixture's haiku tree as torch layers: a bias-free stem conv and its batch norm, a linear
    layer with bias and its batch norm, and a ``logits`` layer whose weight starts at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.initial_conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.initial_batchnorm = nn.BatchNorm2d(4)
        self.linear = nn.Linear(16, 6)
        self.batch_norm = nn.BatchNorm1d(6)
        self.logits = nn.Linear(6, 3)


TORCH_NAME = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}


def _torch_name(haiku_name: str) -> str:
    module, param = haiku_name.split("/")
    return f"{module}.{TORCH_NAME[param]}"


def _to_torch(haiku_name: str, x: np.ndarray) -> np.ndarray:
    """One haiku tensor in torch's layout (a leading step axis, if any, kept in front)."""
    lead = x.ndim - {"initial_conv/w": 4, "linear/w": 2, "logits/w": 2}.get(haiku_name, x.ndim)
    if haiku_name == "initial_conv/w":  # HWIO -> OIHW
        return np.moveaxis(x, (lead + 3, lead + 2), (lead, lead + 1))
    if haiku_name.endswith("/w"):  # (in, out) -> (out, in)
        return np.swapaxes(x, -1, -2)
    return x  # biases and batch norm scale/offset: one value per channel (shape fixed by the caller)


def _load(model: nn.Module, values: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, x in values.items():
            p = params[_torch_name(name)]
            p.copy_(torch.from_numpy(np.ascontiguousarray(_to_torch(name, x))).reshape(p.shape).to(dtype))


def _tree(ref, prefix: str) -> dict[str, np.ndarray]:
    return {n: ref[f"{prefix}.{n}"] for n in ref["lars.names"]}


def _ours(ref, tag: str, hparams: dict[str, float], lrs, taus, steps: int = STEPS):
    """Our LARS (as build_optimizer makes it) and EMA target for ``steps`` steps on the fixture's gradients;
    returns the online and target parameters after each step, by haiku name, in torch layout."""
    dtype = torch.float32 if tag == "f32" else torch.float64
    online, target = Tiny().to(dtype), Tiny().to(dtype)
    _load(online, _tree(ref, "lars.init"), dtype)
    _load(target, _tree(ref, "lars.target_init"), dtype)
    target.requires_grad_(False)
    model = SimpleNamespace(target_encoder=target, target_projector=nn.Sequential(),
                            online_parameters=lambda: list(online.parameters()))
    opt = build_optimizer("lars", online, lr=0.0, weight_decay=hparams["weight_decay"],
                          momentum=hparams["momentum"], trust_coefficient=hparams["eta"])
    params = dict(online.named_parameters())
    tparams = dict(target.named_parameters())
    grads = _tree(ref, "lars.grads")
    hist_o, hist_t = [], []
    for k in range(steps):
        for n, g in grads.items():
            p = params[_torch_name(n)]
            p.grad = torch.from_numpy(np.ascontiguousarray(_to_torch(n, g[k]))).reshape(p.shape).to(dtype)
        set_lr(opt, float(lrs[k]))
        opt.step()
        if taus is not None:
            EMATarget().update(model, float(taus[k]))
        hist_o.append({n: params[_torch_name(n)].detach().numpy().copy() for n in grads})
        hist_t.append({n: tparams[_torch_name(n)].detach().numpy().copy() for n in grads})
    return hist_o, hist_t


TOL = {"f32": dict(rtol=1e-5, atol=1e-6), "f64": dict(rtol=1e-12, atol=1e-14)}


def _compare(ours: list[dict], ref, prefix: str, tag: str) -> None:
    """Our parameters after each step against the release's ``prefix.<name>`` ([1 + steps, *haiku shape],
    the initial values first); as many steps as ``ours`` holds."""
    for n in ref["lars.names"]:
        want = ref[f"{prefix}.{n}"][: 1 + len(ours)]
        got = np.stack([s[n] for s in ours])
        want_t = np.ascontiguousarray(_to_torch(n, want[1:])).reshape(got.shape)
        np.testing.assert_allclose(got, want_t, **TOL[tag], err_msg=f"{prefix}.{n}")
        # The steps themselves, not only where they land: each step's change, to 1e-4 of its size.
        d_got = np.diff(np.concatenate([_to_torch(n, want[:1]).reshape(got[:1].shape), got]), axis=0)
        d_want = np.diff(np.ascontiguousarray(_to_torch(n, want)).reshape((1 + len(ours), *got.shape[1:])), axis=0)
        scale = np.abs(d_want).max()
        np.testing.assert_allclose(d_got, d_want, rtol=0, atol=(1e-4 if tag == "f32" else 1e-10) * scale,
                                   err_msg=f"{prefix}.{n} (per-step change)")


def test_lars_exclusions_match_release(ref):
    """Biases and batch-norm parameters get neither weight decay nor the trust ratio, exactly the
    tensors that the release's filter leaves out; conv and linear weights get both."""
    names = list(ref["lars.names"])
    model = Tiny()
    excluded = excluded_from_decay_and_adaptation(model)
    assert {_torch_name(n) for n, kept in zip(names, ref["lars.adapted"]) if not kept} == excluded
    assert {_torch_name(n) for n, kept in zip(names, ref["lars.adapted"]) if kept} == {
        "initial_conv.weight", "linear.weight", "logits.weight"}
    opt = build_optimizer("lars", model, lr=1.0, weight_decay=1e-6)
    ids = {id(p): name for name, p in model.named_parameters()}
    for group in opt.param_groups:
        adapted = {ids[id(p)] not in excluded for p in group["params"]}
        assert adapted == {group["lars_adapt"]} == {group["weight_decay"] > 0}


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("run", ["paper", "strong"])
def test_lars_and_ema_steps_match_release(ref, run, tag):
    """Five of the release's update steps (LARS as its experiment builds it, lr schedule, target EMA)
    on fixed gradients: our online and target parameters after every step. "paper" uses the 1000-epoch
    hyperparameters (weight decay 1.5e-6, eta 1e-3, momentum 0.9, tau_base 0.996) with warm-up, so the
    first lr is 0; "strong" a weight decay of 0.05 and eta 0.02, so that each term of the step shows.
    The lr and tau fed in are the release's own (their match to our schedules is tested above). At
    float32 a weight decay of 1.5e-6 is below rounding; the float64 runs and "strong" are the ones that
    would catch a decay applied wrongly."""
    h = dict(zip(HPARAMS, ref[f"lars.{run}.hparams"]))
    online, target = _ours(ref, tag, h, ref[f"lars.{run}.{tag}.lr"], ref[f"lars.{run}.{tag}.tau"])
    _compare(online, ref, f"lars.{run}.{tag}.online", tag)
    _compare(target, ref, f"lars.{run}.{tag}.target", tag)


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_lars_constant_lr_steps_match_release(ref, tag):
    """One step and five steps of the release's optimizer at the constant lr 0.2 * 4096 / 256 = 3.2."""
    h = dict(zip(HPARAMS, ref["lars.paper.hparams"]))
    lr = float(ref[f"lars.const.{tag}.lr"])
    assert math.isclose(lr, scaled_lr(h["base_lr"], int(h["batch"])), rel_tol=1e-12)
    one, _ = _ours(ref, tag, h, [lr], None, steps=1)
    _compare(one, ref, f"lars.const.{tag}.online", tag)
    five, _ = _ours(ref, tag, h, [lr] * STEPS, None)
    _compare(five, ref, f"lars.const.{tag}.online", tag)
    assert all(np.array_equal(one[0][n], five[0][n]) for n in ref["lars.names"])
