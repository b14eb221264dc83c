"""Method presets (method.name): byol, simsiam, simclr as configurations of one module."""
from __future__ import annotations

import pytest
import torch
import yaml

from byol.config import apply_overrides, config_from_dict, load_config
from byol.config.sections import ConfigError
from byol.export import export_encoder, load_encoder
from byol.losses import symmetric_regression_loss
from byol.models import OnlineTarget, StopGradTarget
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY, tiny_byol


def test_presets_fill_what_the_config_does_not_set():
    byol = load_config(None, [])
    assert (byol.method.predictor, byol.method.target, byol.method.loss) == (True, "ema", "regression")
    sim = load_config(None, ["method.name=simsiam"])
    assert (sim.method.predictor, sim.method.target, sim.method.loss) == (True, "online_stopgrad", "regression")
    assert (sim.model.projector_out, sim.model.predictor_hidden) == (2048, 512)
    assert (sim.optim.name, sim.optim.base_lr, sim.optim.weight_decay) == ("sgd", 0.05, 1e-4)
    clr = load_config(None, ["method.name=simclr"])
    assert (clr.method.predictor, clr.method.target, clr.method.loss, clr.method.beta) == (
        False, "online", "infonce", 1.0)
    mine = load_config(None, ["method.name=simsiam", "optim.base_lr=0.1", "model.predictor_hidden=64"])
    assert (mine.optim.base_lr, mine.model.predictor_hidden, mine.optim.name) == (0.1, 64, "sgd")
    moco = load_config(None, ["method.name=moco"])
    assert (moco.method.predictor, moco.method.target, moco.method.loss, moco.method.beta) == (
        False, "ema", "infonce", 1.0)
    assert (moco.method.alpha, moco.method.tau_base, moco.method.queue_size) == (0.2, 0.999, 65536)
    assert (moco.model.head_norm, moco.optim.name, moco.optim.base_lr) == ("none", "sgd", 0.03)
    # the short forms: method=NAME on the command line, "method: NAME" in a file
    short = config_from_dict(apply_overrides({"method": "simclr"}, ["method.alpha=0.5"]))
    assert (short.method.name, short.method.beta, short.method.alpha) == ("simclr", 1.0, 0.5)
    assert load_config(None, ["method=moco"]).method.queue_size == 65536
    with pytest.raises(ConfigError, match="method.name must be one of byol, simsiam, simclr, moco, got 'moco2'"):
        load_config(None, ["method.name=moco2"])


def test_simsiam_stops_the_gradient_on_the_projection_branch_only():
    v1, v2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    model = tiny_byol(target=StopGradTarget())
    loss = model(v1, v2).loss
    grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
    # by hand: z' = the online projection, detached; p = q(z) keeps its graph
    z1, z2 = model.projector(model.encoder(v1)), model.projector(model.encoder(v2))
    manual = symmetric_regression_loss(model.predictor(z1), model.predictor(z2), z1.detach(), z2.detach())
    expected = torch.autograd.grad(manual, list(model.encoder.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, expected))
    # without the stop-gradient the same weights give other gradients (both branches)
    free = tiny_byol(target=OnlineTarget())
    free_loss = free(v1, v2).loss
    other = torch.autograd.grad(free_loss, list(free.encoder.parameters()))
    assert torch.allclose(loss, free_loss)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, other))
    assert not model.target_parameters()  # no momentum encoder


@pytest.mark.parametrize("name", ["byol", "simsiam", "simclr", "moco"])
def test_preset_trains_checkpoints_and_resumes_exactly(tmp_path, name):
    # moco: a queue of 32 keys, which the 16 keys of each step wrap around within the first run
    queue = ["method.queue_size=32"] if name == "moco" else []

    def cfg(run, *extra):
        return load_config(None, [*TINY, f"method.name={name}", "data.dataset=shapes", "data.shapes_size=48",
                                  "data.val_fraction=0", f"train.out_dir={tmp_path}", f"train.name={run}",
                                  *queue, *extra])
    full = pretrain(cfg("full"))
    part = pretrain(cfg("split", "train.max_steps=5"))
    stopped = load_checkpoint(find_checkpoint(part.run_dir))["model"]
    done = pretrain(cfg("split"), resume=part.run_dir)
    assert full.finished and done.finished
    a = load_checkpoint(find_checkpoint(full.run_dir))
    b = load_checkpoint(find_checkpoint(done.run_dir))
    assert yaml.safe_load((full.run_dir / "config.yaml").read_text())["method"]["name"] == name
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the evaluation path (byol eval / export load the run through eval.commands.load_checkpoint_run)
    enc = load_encoder(export_encoder(full.run_dir, tmp_path / f"{name}.safetensors")["out"])
    assert all(torch.equal(v, a["model"][f"encoder.{k}"]) for k, v in enc.state_dict().items())
    if name == "moco":  # the queue is in the checkpoint: full, and restored on resume (equal above)
        assert int(stopped["queue.count"]) == 32 and int(stopped["queue.ptr"]) == (5 * 16) % 32
        assert not torch.equal(stopped["queue.keys"], b["model"]["queue.keys"])


def test_projector_and_predictor_norms_are_set_independently():
    from byol.models.build import build_model

    def norms(*extra):
        m = build_model(load_config(None, [*TINY, *extra]))
        return type(m.projector.net[1]).__name__, type(m.predictor.net[1]).__name__

    assert norms() == ("BatchNorm1d", "BatchNorm1d")
    assert norms("model.head_norm=ln") == ("LayerNorm", "LayerNorm")
    assert norms("model.predictor_norm=none") == ("BatchNorm1d", "Identity")
    assert norms("model.head_norm=none", "model.predictor_norm=bn") == ("Identity", "BatchNorm1d")
    with pytest.raises(ConfigError, match="model.predictor_norm"):
        load_config(None, ["model.predictor_norm=group"])


TARGET_NETWORKS = ["target_encoder", "target_projector"]


@pytest.mark.parametrize("name,target,loss,parts", [
    ("byol", "EMATarget", "RegressionLoss", ["encoder", "projector", "predictor", *TARGET_NETWORKS]),
    ("simsiam", "StopGradTarget", "RegressionLoss", ["encoder", "projector", "predictor"]),
    ("simclr", "OnlineTarget", "InfoNCELoss", ["encoder", "projector"]),
    ("moco", "EMATarget", "InfoNCELoss", ["queue", "encoder", "projector", *TARGET_NETWORKS]),
])
def test_every_preset_is_assembled_from_its_parts_under_the_checkpoint_names(name, target, loss, parts):
    """Checkpoints, exports and load_encoder read these state-dict names: the parts in this order,
    the target's networks named like the online ones, the queue's three buffers."""
    from byol.models.build import build_model

    m = build_model(load_config(None, [*TINY, f"method.name={name}"]))
    assert (type(m.target).__name__, type(m.loss).__name__) == (target, loss)
    sd = m.state_dict()
    assert list(dict.fromkeys(k.split(".")[0] for k in sd)) == parts
    online = [k for k in sd if k.startswith(("encoder.", "projector."))]
    if "target_encoder" in parts:
        assert [k for k in sd if k.startswith("target_")] == [f"target_{k}" for k in online]
        assert all(sd[f"target_{k}"].shape == sd[k].shape for k in online)
    queue = ["queue.keys", "queue.ptr", "queue.count"] if name == "moco" else []
    assert [k for k in sd if k.startswith("queue.")] == queue
