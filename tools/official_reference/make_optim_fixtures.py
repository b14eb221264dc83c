"""Write tests/fixtures/official/optim.npz: reference values computed by DeepMind's released BYOL code.

What is recorded (all computed by calling the release's own functions; nothing of it is copied here):

* the learning-rate schedule (``utils/schedules.learning_schedule``: linear warm-up then cosine) for a
  few (batch size, base lr, total steps, warm-up steps) settings, one of them the 1000-epoch ImageNet
  run of ``configs/byol.py``;
* the target EMA rate (``utils/schedules.target_ema``) for the paper's three tau_base values;
* the loss on fixed random vectors: ``utils/helpers.regression_loss`` per pair in both directions, and
  ``ByolExperiment.loss_fn``'s representation loss and its gradient with respect to the predictions
  (``loss_fn`` runs for real; only the network's forward pass is replaced by one that returns the fixed
  vectors);
* LARS: a small haiku parameter tree (a conv weight, a linear weight and bias, two batch norms and a
  zero-initialised linear weight, named as haiku names them in the release's ResNet and MLP heads) and
  fixed gradients. ``ByolExperiment._update_fn`` runs 5 steps for real (the optimizer as the experiment
  builds it, with its bias/norm filter; the lr schedule; the target EMA), with a loss whose gradient is
  the fixed gradient, once with the release's 1000-epoch hyperparameters and once with exaggerated ones
  (large weight decay and trust coefficient, so that every term of the update shows); plus 5 steps of
  the experiment's optimizer at a constant lr. Online and target parameters are recorded after every
  step, in float32 (as the release trains) and float64.

Parameter names in the fixture are the haiku paths joined with "/", e.g. ``initial_conv/w``.

Development only (CI never runs this, it only reads what it writes); setup and versions:
tools/official_reference/README.md.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from release import import_release

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official" / "optim.npz"
IMAGENET_TRAIN = 1281167  # the release's TRAIN_AND_VALID split size, checked against it below
STEPS = 5




def set_x64(on: bool) -> None:
    import jax

    jax.config.update("jax_enable_x64", on)


def schedules(rel, out: dict) -> None:
    """lr and tau at many steps, float32 (x64 off, as the release runs) and float64 (x64 on)."""
    import jax.numpy as jnp

    big = rel.config.get_config(1000, 4096)
    lr_settings = [  # (batch, base lr, total steps, warm-up steps)
        (4096, big["lr_schedule_config"]["base_learning_rate"], big["max_steps"],
         big["lr_schedule_config"]["warmup_steps"]),
        (256, 0.3, 100, 10),
        (1024, 0.45, 50, 0),
    ]
    for i, (batch, base, total, warmup) in enumerate(lr_settings):
        steps = _steps(total, warmup)
        out[f"lr{i}.setting"] = np.array([batch, base, total, warmup], dtype=np.float64)
        out[f"lr{i}.steps"] = steps
        k = jnp.asarray(steps, dtype=jnp.int32)
        out[f"lr{i}.f32"] = np.asarray(rel.schedules.learning_schedule(k, batch, base, total, warmup))
        # Under x64 the warm-up branch still casts to float32 and so does the whole result; the release's
        # cosine helper, which the schedule calls after the warm-up, gives the float64 values of that part.
        set_x64(True)
        after = jnp.asarray(steps[steps >= warmup] - warmup, dtype=jnp.int64)
        out[f"lr{i}.cos64"] = np.asarray(rel.schedules._cosine_decay(after, total - warmup, base * batch / 256.0))
        assert out[f"lr{i}.cos64"].dtype == np.float64
        set_x64(False)

    tau_settings = [(0.996, big["max_steps"]), (0.99, 1000), (0.97, 37)]
    for i, (base, total) in enumerate(tau_settings):
        steps = _steps(total, 0)
        out[f"tau{i}.setting"] = np.array([base, total], dtype=np.float64)
        out[f"tau{i}.steps"] = steps
        for x64, tag in ((False, "f32"), (True, "f64")):
            set_x64(x64)
            k = jnp.asarray(steps, dtype=jnp.int64 if x64 else jnp.int32)
            out[f"tau{i}.{tag}"] = np.asarray(rel.schedules.target_ema(k, base, total))
    set_x64(False)


def _steps(total: int, warmup: int) -> np.ndarray:
    """Every step of a short schedule; for a long one ~400 steps plus each boundary and its neighbours."""
    if total <= 2000:
        s = np.arange(total + 6)
    else:
        s = np.linspace(0, total, 400).round().astype(np.int64)
        edges = [0, 1, 2, warmup - 1, warmup, warmup + 1, total // 2, total - 2, total - 1, total, total + 1, total + 7]
        s = np.concatenate([s, edges])
    return np.unique(s[s >= 0]).astype(np.int64)


def loss(rel, out: dict) -> None:
    """regression_loss per pair, and loss_fn's representation loss with its gradient (float32)."""
    import jax
    import jax.numpy as jnp

    exp = rel.experiment.ByolExperiment
    rng = np.random.default_rng(1)
    b, d = 16, 32
    p1, p2, z1, z2 = (rng.standard_normal((b, d)).astype(np.float32) for _ in range(4))
    cases = {
        "gauss": (p1, p2, z1, z2),
        # Rows at very different scales: the loss only sees directions.
        "scaled": tuple((v * 10.0 ** rng.uniform(-3, 3, (b, 1))).astype(np.float32) for v in (p1, p2, z1, z2)),
        # Predictions close to their targets, as late in training (a small loss is hard to get exact).
        "aligned": (
            (2.0 * z2 + 0.05 * rng.standard_normal((b, d))).astype(np.float32),
            (0.5 * z1 + 0.05 * rng.standard_normal((b, d))).astype(np.float32),
            z1, z2,
        ),
    }

    def forward_apply(params, state, inputs, is_training):
        # Stands in for the network: returns the fixed vectors, which are the "parameters".
        del inputs, is_training
        logits = jnp.zeros((b, 10), jnp.float32)
        return dict(prediction_view1=params["p1"], prediction_view2=params["p2"], projection_view1=params["z1"],
                    projection_view2=params["z2"], logits_view1=logits), state

    fake = SimpleNamespace(forward=SimpleNamespace(apply=forward_apply), _num_classes=10,
                           _should_transpose_images=lambda: False)
    images = jnp.full((b, 4, 4, 3), 0.5, jnp.float32)
    inputs = dict(view1=images, view2=images, labels=jnp.zeros((b,), jnp.int32))

    def repr_loss(online, target):
        total, (_, logs) = exp.loss_fn(fake, online, target, {}, {}, jax.random.PRNGKey(0), inputs)
        return total, logs

    for name, (q1, q2, t1, t2) in cases.items():
        for key, v in zip(("p1", "p2", "z1", "z2"), (q1, q2, t1, t2)):
            out[f"loss.{name}.{key}"] = v
        out[f"loss.{name}.l12"] = np.asarray(rel.helpers.regression_loss(q1, t2))
        out[f"loss.{name}.l21"] = np.asarray(rel.helpers.regression_loss(q2, t1))
        online = dict(p1=q1, p2=q2, z1=np.zeros_like(t1), z2=np.zeros_like(t2))
        target = dict(p1=np.zeros_like(q1), p2=np.zeros_like(q2), z1=t1, z2=t2)
        grads, logs = jax.grad(repr_loss, has_aux=True)(online, target)
        assert np.isclose(float(logs["classif_loss"]), np.log(10.0))  # constant logits: no gradient from it
        out[f"loss.{name}.repr_loss"] = np.asarray(logs["repr_loss"])
        out[f"loss.{name}.grad_p1"] = np.asarray(grads["p1"])
        out[f"loss.{name}.grad_p2"] = np.asarray(grads["p2"])

    # Rows of (almost) zero norm: how the release's normalisation treats them.
    p = rng.standard_normal((6, d)).astype(np.float32)
    z = rng.standard_normal((6, d)).astype(np.float32)
    p[:4] *= np.array([[0.0], [1e-8], [1e-7], [1e-5]], dtype=np.float32)
    z[5] = 0.0
    out["loss.tiny.p"], out["loss.tiny.z"] = p, z
    out["loss.tiny.l"] = np.asarray(rel.helpers.regression_loss(p, z))


def lars(rel, out: dict) -> None:
    """Five real ``_update_fn`` steps (LARS + lr schedule + target EMA) with fixed gradients, and five steps
    of the experiment's optimizer at a constant lr, in float32 and float64."""
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import optax
    import tree

    exp = rel.experiment.ByolExperiment

    def net(x):
        # Names as in the release: ResNet stem conv without bias and "initial_batchnorm"; the MLP head's
        # hk.Linear with bias and default-named "batch_norm"; "logits" with a zero-initialised weight.
        h = hk.Conv2D(4, 3, with_bias=False, name="initial_conv")(x)
        h = hk.BatchNorm(True, True, 0.9, name="initial_batchnorm")(h, is_training=True)
        h = hk.Linear(6, name="linear")(hk.Flatten()(h))
        h = hk.BatchNorm(True, True, 0.9)(h, is_training=True)
        return hk.Linear(3, w_init=jnp.zeros, name="logits")(h)

    shapes = hk.transform_with_state(net).init(jax.random.PRNGKey(0), jnp.zeros((2, 2, 2, 2)))[0]
    flat = {f"{m}/{n}": v.shape for m, ps in shapes.items() for n, v in ps.items()}
    names = sorted(flat)
    rng = np.random.default_rng(2)
    scale = {"initial_conv/w": 0.3, "linear/w": 0.2, "linear/b": 0.1, "logits/w": 0.0, "logits/b": 0.05}
    init = {}
    for n in names:
        if n.endswith("/scale"):
            init[n] = 1.0 + 0.2 * rng.standard_normal(flat[n])
        elif n.endswith("/offset"):
            init[n] = 0.1 * rng.standard_normal(flat[n])
        else:
            init[n] = scale[n] * rng.standard_normal(flat[n])
    target0 = {n: v + 0.1 * rng.standard_normal(v.shape) for n, v in init.items()}
    # Gradients of unequal sizes per tensor and per step, so that the trust ratios differ and momentum mixes.
    grads = {n: np.stack([10.0 ** rng.uniform(-2, 0) * rng.standard_normal(flat[n]) for _ in range(STEPS)])
             for n in names}
    out["lars.names"] = np.array(names)
    for n in names:
        out[f"lars.init.{n}"] = init[n].astype(np.float64)
        out[f"lars.target_init.{n}"] = target0[n].astype(np.float64)
        out[f"lars.grads.{n}"] = grads[n].astype(np.float64)

    def nest(d):
        t: dict = {}
        for k, v in d.items():
            m, p = k.split("/")
            t.setdefault(m, {})[p] = v
        return t

    def unnest(t):
        return {f"{m}/{p}": np.asarray(v) for m, ps in t.items() for p, v in ps.items()}

    # Which tensors the release's filter lets through to weight decay and the trust ratio.
    kept = unnest(tree.map_structure_with_path(rel.optimizers.exclude_bias_and_norm, nest(init)))
    out["lars.adapted"] = np.array([bool(kept[n]) for n in names])

    big = rel.config.get_config(1000, 4096)
    runs = {
        # The 1000-epoch ImageNet hyperparameters, on a 10-step schedule with 3 warm-up steps.
        "paper": dict(batch=4096, base_lr=big["lr_schedule_config"]["base_learning_rate"], total=10, warmup=3,
                      tau_base=big["base_target_ema"], **big["optimizer_config"]),
        # Exaggerated decay and trust coefficient, no warm-up: every term of the step is visible.
        "strong": dict(batch=512, base_lr=0.6, total=7, warmup=0, tau_base=0.9,
                       weight_decay=0.05, eta=0.02, momentum=0.8),
    }
    for run, h in runs.items():
        out[f"lars.{run}.hparams"] = np.array([h[k] for k in HPARAMS], dtype=np.float64)

    for x64, tag in ((False, "f32"), (True, "f64")):
        set_x64(x64)
        dt = jnp.float64 if x64 else jnp.float32

        def cast(d, dt=dt):
            return nest({k: jnp.asarray(v, dt) for k, v in d.items()})

        for run, h in runs.items():
            fake = SimpleNamespace(
                _optimizer_config=dict(weight_decay=h["weight_decay"], eta=h["eta"], momentum=h["momentum"]),
                _lr_schedule_config=dict(base_learning_rate=h["base_lr"], warmup_steps=h["warmup"]),
                _batch_size=h["batch"], _max_steps=h["total"], _base_target_ema=h["tau_base"])
            fake._optimizer = functools.partial(exp._optimizer, fake)
            step_grads = [cast({n: grads[n][k] for n in names}) for k in range(STEPS)]

            def loss_fn(online, target, online_state, target_state, rng_, inputs, step_grads=step_grads):
                # A loss whose gradient is the fixed gradient of the current step (inputs carries the step).
                g = jax.tree_util.tree_map(lambda *gs: jnp.stack(gs)[inputs], *step_grads)
                lin = sum(jnp.sum(p * jax.lax.stop_gradient(q)) for p, q in
                          zip(jax.tree_util.tree_leaves(online), jax.tree_util.tree_leaves(g)))
                return lin, (dict(online_state=online_state, target_state=target_state), {})

            fake.loss_fn = loss_fn
            update = jax.pmap(functools.partial(exp._update_fn, fake), axis_name="i")
            online, target = cast(init), cast(target0)
            state = rel.experiment._ByolExperimentState(
                online_params=online, target_params=target, online_state={}, target_state={},
                opt_state=fake._optimizer(0).init(online))
            state = jax.tree_util.tree_map(lambda x: x[None], state)
            hist_o, hist_t, lrs, taus = [unnest(online)], [unnest(target)], [], []
            for k in range(STEPS):
                state, logs = update(state, jnp.asarray([k]), jax.random.PRNGKey(0)[None], jnp.asarray([k]))
                hist_o.append(unnest(jax.tree_util.tree_map(lambda x: x[0], state.online_params)))
                hist_t.append(unnest(jax.tree_util.tree_map(lambda x: x[0], state.target_params)))
                lrs.append(float(logs["learning_rate"][0]))
                taus.append(float(logs["tau"][0]))
            out[f"lars.{run}.{tag}.lr"] = np.array(lrs)
            out[f"lars.{run}.{tag}.tau"] = np.array(taus)
            for n in names:
                out[f"lars.{run}.{tag}.online.{n}"] = np.stack([s[n] for s in hist_o])
                out[f"lars.{run}.{tag}.target.{n}"] = np.stack([s[n] for s in hist_t])

        # The experiment's optimizer at one constant lr for every step (its paper hyperparameters).
        h = runs["paper"]
        fake = SimpleNamespace(_optimizer_config=dict(weight_decay=h["weight_decay"], eta=h["eta"],
                                                      momentum=h["momentum"]))
        lr = h["base_lr"] * h["batch"] / 256
        opt = exp._optimizer(fake, lr)
        params = cast(init)
        opt_state = exp._optimizer(fake, 0).init(params)
        hist = [unnest(params)]
        for k in range(STEPS):
            updates, opt_state = opt.update(cast({n: grads[n][k] for n in names}), opt_state, params)
            params = optax.apply_updates(params, updates)
            hist.append(unnest(params))
        out[f"lars.const.{tag}.lr"] = np.array(lr)
        for n in names:
            out[f"lars.const.{tag}.online.{n}"] = np.stack([s[n] for s in hist])
    set_x64(False)


HPARAMS = ("batch", "base_lr", "total", "warmup", "tau_base", "weight_decay", "eta", "momentum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", default="/work/dmbyol", help="directory holding the release's byol package")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rel = import_release(args.release)
    assert rel.dataset.Split.TRAIN_AND_VALID.num_examples == IMAGENET_TRAIN
    out: dict[str, np.ndarray] = {}
    schedules(rel, out)
    loss(rel, out)
    lars(rel, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {len(out)} arrays, {args.out.stat().st_size / 1024:.1f} kB")


if __name__ == "__main__":
    main()
