"""Write the checkpoint fixtures of tests/test_official_checkpoint.py with DeepMind's released BYOL code.

Three files under tests/fixtures/official/, all generated (nothing of the release is copied here):

* ``checkpoint_small.pkl``: a checkpoint in the release's own format, written by the release's own
  code. A ``ByolExperiment`` (byol_experiment.py) with the ResNet-50 of utils/networks.py at 1/16 of
  its width (64 -> 4 stem channels, so the file stays small), small projector and predictor, is
  initialised by its ``_make_initial_state`` under ``jax.pmap`` (as its training loop does), its
  online batch-norm scales and offsets drawn at random (the init's zero scales would hide the
  residual branches from the test), trained for a few steps by its own ``update_pmap`` on random
  images (so the batch-norm moving averages, the LARS momentum and the weights all move), and saved
  by its own ``save_checkpoint``: utils/checkpointing.py's dill pickle, protocol 2, of
  {experiment_state, step, rng}, the rng a jax array.
  The release's ``width_multiplier`` is meant to be an integer; a small object whose products with
  the channel counts are integer divisions stands in for 1/16, so the network code runs unchanged.
* ``checkpoint_small.npz``: two fixed uint8 image batches, NHWC (2 x 64 x 64 x 3 and an odd size,
  2 x 45 x 45 x 3, where "SAME" padding changes with the parity of each layer's input), and the
  release encoder's representation of each (``is_training=False``: the moving averages; the
  images scaled to [0, 1] and normalised by the release's ``dataset.normalize_images``, as its
  experiment does before the network).
* ``resnet_shapes.json``: the haiku parameter and state names and shapes of the full BYOL network
  (encoder, projector, predictor, classifier) of the two published checkpoints, ResNet-50 x1 and
  ResNet-200 x2, from ``jax.eval_shape`` of the network's init (no arrays are made).

Development only (CI never runs this, it only reads what it writes); setup and versions:
tools/official_reference/README.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import numpy as np
from release import import_release

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official"
DIVISOR = 16  # the fixture's ResNet-50 is 1/DIVISOR as wide as ResNet-50 x1
TRAIN_STEPS = 3
BATCH = 4  # per training step (one device)


class Divide:
    """Stands in for the width multiplier 1/n: ``c * Divide(n) == c // n`` (c must divide)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __mul__(self, channels: int) -> int:
        if channels % self.n:
            raise ValueError(f"{channels} channels do not divide by {self.n}")
        return channels // self.n

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"1/{self.n}"




def experiment(rel, network_config: dict, checkpoint_dir: str, max_steps: int = 1000, num_classes: int = 5):
    """A ByolExperiment of the release's 1000-epoch config with ``network_config``."""
    cfg = rel.config.get_config(num_epochs=1000, batch_size=BATCH)
    cfg.update(num_classes=num_classes, max_steps=max_steps, network_config=network_config,
               lr_schedule_config=dict(base_learning_rate=0.2, warmup_steps=1),
               checkpointing_config=dict(use_checkpointing=True, checkpoint_dir=checkpoint_dir,
                                         save_checkpoint_interval=1, filename="checkpoint.pkl"))
    return rel.experiment.ByolExperiment(**cfg)


def network_config(rel, encoder_class: str, width, projector_hidden: int, out: int, predictor_hidden: int) -> dict:
    net = dict(rel.config.get_config(num_epochs=1000, batch_size=BATCH)["network_config"])
    net.update(projector_hidden_size=projector_hidden, projector_output_size=out,
               predictor_hidden_size=predictor_hidden, encoder_class=encoder_class,
               encoder_config=dict(resnet_v2=False, width_multiplier=width))
    return net


def random_batch(rng: np.random.Generator, size: int) -> dict:
    """One device's training inputs, [1, BATCH, size, size, 3] in [0, 1] (the pmapped layout)."""
    def images():
        return rng.uniform(0.0, 1.0, (1, BATCH, size, size, 3)).astype(np.float32)

    return {"view1": images(), "view2": images(), "labels": rng.integers(0, 5, (1, BATCH)).astype(np.int32)}


def on_devices(x):
    """``x`` with a leading axis of length 1: one copy for the one local device ``jax.pmap`` maps over
    (the release's own helper uses a jax function removed since)."""
    import jax.numpy as jnp

    return jnp.asarray(x)[None]


def randomise_norms(params, rng: np.random.Generator):
    """Every batch-norm scale ~ U(0.5, 1.5) and offset ~ N(0, 0.2) (same shapes and dtypes)."""
    import jax.numpy as jnp

    out = {}
    for module, leaves in params.items():
        leaves = dict(leaves)
        if "batchnorm" in module.rsplit("/", 1)[-1]:
            leaves["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, leaves["scale"].shape), leaves["scale"].dtype)
            leaves["offset"] = jnp.asarray(rng.normal(0.0, 0.2, leaves["offset"].shape), leaves["offset"].dtype)
        out[module] = leaves
    return out


def small_checkpoint(rel, out_dir: Path) -> None:
    import dill
    import haiku as hk
    import jax

    np_rng = np.random.default_rng(0)
    width = Divide(DIVISOR)
    net_cfg = network_config(rel, "ResNet50", width, 16, 8, 16)
    with tempfile.TemporaryDirectory() as tmp:
        exp = experiment(rel, net_cfg, tmp, max_steps=TRAIN_STEPS)
        batches = [random_batch(np_rng, 64) for _ in range(TRAIN_STEPS)]
        init = jax.pmap(exp._make_initial_state, axis_name="i")
        state = init(rng=on_devices(jax.random.PRNGKey(0)), dummy_input=batches[0])
        state = state._replace(online_params=randomise_norms(state.online_params, np_rng))
        rng = jax.random.PRNGKey(1)
        for step, inputs in enumerate(batches):
            step_rng, rng = tuple(jax.random.split(rng))
            state, _ = exp.update_pmap(state, global_step=on_devices(np.int32(step)),
                                       rng=jax.random.split(step_rng, num=1), inputs=inputs)
        exp._byol_state = state
        exp.save_checkpoint(TRAIN_STEPS, rng)  # step >= max_steps: the final save, written at once
        raw = (Path(tmp) / "checkpoint.pkl").read_bytes()
    (out_dir / "checkpoint_small.pkl").write_bytes(raw)

    saved = dill.loads(raw)["experiment_state"]
    bn_config = {k: v for k, v in net_cfg["bn_config"].items() if k != "cross_replica_axis"}

    def represent(images):
        net = rel.networks.ResNet50(num_classes=None, bn_config=bn_config, resnet_v2=False, width_multiplier=width)
        return net(rel.dataset.normalize_images(images), is_training=False)

    forward = hk.without_apply_rng(hk.transform_with_state(represent))
    params = {k: v for k, v in saved.online_params.items() if k.startswith("res_net50")}
    net_state = {k: v for k, v in saved.online_state.items() if k.startswith("res_net50")}
    arrays = {}
    for name, size in (("64", 64), ("45", 45)):
        images = np_rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        y, _ = forward.apply(params, net_state, images.astype(np.float32) / 255.0)
        arrays[f"images_{name}"] = images
        arrays[f"representation_{name}"] = np.asarray(y, np.float32)
    arrays["divisor"] = np.int64(DIVISOR)
    np.savez_compressed(out_dir / "checkpoint_small.npz", **arrays)


def shapes_of(tree) -> dict:
    return {module: {name: list(leaf.shape) for name, leaf in leaves.items()} for module, leaves in tree.items()}


def published_shapes(rel, out_dir: Path) -> None:
    """Names and shapes of the networks of pretrain_res50x1.pkl and pretrain_res200x2.pkl."""
    import jax
    import jax.numpy as jnp

    out = {}
    for key, encoder_class, width in (("resnet50_x1", "ResNet50", 1), ("resnet200_x2", "ResNet200", 2)):
        with tempfile.TemporaryDirectory() as tmp:
            exp = experiment(rel, network_config(rel, encoder_class, width, 4096, 256, 4096), tmp, num_classes=1000)
            dummy = {"view1": jnp.zeros((2, 224, 224, 3)), "view2": jnp.zeros((2, 224, 224, 3)),
                     "labels": jnp.zeros((2,), jnp.int32)}
            # the release's bn_config names the pmap axis 'i': trace the init under that axis
            init = jax.vmap(functools.partial(exp.forward.init, is_training=True), axis_name="i")
            params, state = jax.eval_shape(init, jax.random.split(jax.random.PRNGKey(0), 1),
                                           jax.tree_util.tree_map(lambda x: x[None], dummy))
            squeeze = functools.partial(jax.tree_util.tree_map, lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype))
            out[key] = {"encoder_class": encoder_class, "width_multiplier": width,
                        "params": shapes_of(squeeze(params)), "state": shapes_of(squeeze(state))}
    (out_dir / "resnet_shapes.json").write_text(one_module_a_line(out))


def one_module_a_line(out: dict) -> str:
    """JSON with one haiku module per line (readable diffs, a tenth of the size of indented JSON)."""
    lines = ["{"]
    for i, (key, net) in enumerate(out.items()):
        lines.append(f' "{key}": {{"encoder_class": "{net["encoder_class"]}", '
                     f'"width_multiplier": {net["width_multiplier"]},')
        for j, tree in enumerate(("params", "state")):
            lines.append(f'  "{tree}": {{')
            modules = sorted(net[tree].items())
            for k, (module, leaves) in enumerate(modules):
                comma = "," if k < len(modules) - 1 else ""
                lines.append(f"   {json.dumps(module)}: {json.dumps(leaves, sort_keys=True)}{comma}")
            lines.append("  }" + ("," if j == 0 else ""))
        lines.append(" }" + ("," if i < len(out) - 1 else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == out
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="/work/dmbyol", help="directory holding the release's byol package")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rel = import_release(args.release)
    args.out.mkdir(parents=True, exist_ok=True)
    small_checkpoint(rel, args.out)
    published_shapes(rel, args.out)
    for f in sorted(args.out.glob("checkpoint_small.*")) + [args.out / "resnet_shapes.json"]:
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
