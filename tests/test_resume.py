"""Resume: N steps without stopping == k steps, stop, resume, N-k steps (docs/method.md, docs/reliability.md)."""
from __future__ import annotations

import json

import torch

from byol.config import load_config
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY


def _cfg(tmp_path, name, *extra):
    # 48 images, batch 8 -> 6 steps per epoch, 2 epochs = 12 steps
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48",
                              "data.val_fraction=0", f"train.out_dir={tmp_path}",
                              f"train.name={name}", "train.checkpoint_every=100", *extra])


def _params(run_dir):
    sd = load_checkpoint(find_checkpoint(run_dir))
    return sd["model"], sd


def test_stop_and_resume_mid_epoch_is_exact(tmp_path):
    full = pretrain(_cfg(tmp_path, "full"))
    assert full.finished and full.step == 12

    part = pretrain(_cfg(tmp_path, "split", "train.max_steps=4"))  # stop inside epoch 0
    assert not part.finished and part.step == 4
    _, sd = _params(part.run_dir)
    assert (sd["epoch"], sd["step_in_epoch"]) == (0, 4)
    part = pretrain(_cfg(tmp_path, "split", "train.max_steps=9"), resume=part.run_dir)  # inside epoch 1
    assert part.step == 9
    done = pretrain(_cfg(tmp_path, "split"), resume=part.run_dir)
    assert done.finished and done.step == 12

    a, sd_a = _params(full.run_dir)
    b, sd_b = _params(done.run_dir)
    assert a.keys() == b.keys()
    online = [k for k in a if k.startswith(("encoder.", "projector.", "predictor."))]
    target = [k for k in a if k.startswith("target_")]
    assert online and target
    for k in a:  # bitwise: same data order, same augmentations, same arithmetic
        assert torch.equal(a[k], b[k]), k
    for s_a, s_b in zip(sd_a["optimizer"]["state"].values(), sd_b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    # the online linear classifier (a monitor, in the checkpoint too) resumes exactly as well
    for k, v in sd_a["probe"]["module"].items():
        assert torch.equal(v, sd_b["probe"]["module"][k]), k
    for s_a, s_b in zip(sd_a["probe"]["optimizer"]["state"].values(), sd_b["probe"]["optimizer"]["state"].values()):
        assert torch.equal(s_a["exp_avg"], s_b["exp_avg"]) and torch.equal(s_a["exp_avg_sq"], s_b["exp_avg_sq"])

    # the log has each step once, in order, and matches the uninterrupted run's losses
    rows = [json.loads(x) for x in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert [r["online_linear_top1"] for r in rows] == [r["online_linear_top1"] for r in ref]


def test_training_changes_both_networks_and_checkpoint_is_weights_only(tmp_path):
    cfg = _cfg(tmp_path, "one", "train.max_steps=2")
    torch.manual_seed(cfg.train.seed)
    from byol.models.build import build_model

    init = build_model(cfg).state_dict()
    run = pretrain(cfg)
    trained = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    changed = {k.split(".")[0] for k in init if init[k].is_floating_point() and not torch.equal(init[k], trained[k])}
    assert {"encoder", "projector", "predictor", "target_encoder", "target_projector"} <= changed


def test_stop_at_an_epoch_boundary_then_resume(tmp_path):
    full = pretrain(_cfg(tmp_path, "full"))
    part = pretrain(_cfg(tmp_path, "split", "train.max_steps=6"))  # exactly one epoch
    _, sd = _params(part.run_dir)
    assert (sd["epoch"], sd["step_in_epoch"]) == (1, 0)
    done = pretrain(_cfg(tmp_path, "split"), resume=part.run_dir)
    a, _ = _params(full.run_dir)
    b, _ = _params(done.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_rows_logged_after_the_checkpoint_and_torn_lines(tmp_path):
    part = pretrain(_cfg(tmp_path, "torn", "train.max_steps=4"))
    with (part.run_dir / "metrics.jsonl").open("a") as f:  # a crash after step 4's checkpoint
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
        f.write('{"step": 6, "loss": 1.2')  # torn by a hard kill
    done = pretrain(_cfg(tmp_path, "torn"), resume=part.run_dir)
    rows = [json.loads(x) for x in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and 9.0 not in [r["loss"] for r in rows]


def test_resume_refuses_changed_data(tmp_path):
    part = pretrain(_cfg(tmp_path, "data", "train.max_steps=2"))
    import pytest

    from byol.data.errors import DataError

    with pytest.raises(DataError, match="48 images"):
        pretrain(_cfg(tmp_path, "data", "data.shapes_size=40"), resume=part.run_dir)


def test_batched_augmentation_backend_trains_and_resumes_exactly(tmp_path):
    """augment.backend=batched: the workers crop and flip (uint8), the loop draws the rest of T
    and T' per sample on the device from a generator seeded by the step: resume stays exact."""
    from byol.config import Augment
    from byol.data.transforms import make_views

    views = make_views(Augment(preset="byol32", size=16, backend="batched"))
    v1, v2 = views(torch.randint(0, 256, (3, 24, 20), dtype=torch.uint8))
    # official semantics (the default): the workers hand float32 crops in [0, 1] to the device
    assert v1.dtype == v2.dtype == torch.float32 and v1.shape == v2.shape == (3, 16, 16)

    full = pretrain(_cfg(tmp_path, "bfull", "augment.backend=batched"))
    part = pretrain(_cfg(tmp_path, "bsplit", "augment.backend=batched", "train.max_steps=4"))
    done = pretrain(_cfg(tmp_path, "bsplit", "augment.backend=batched"), resume=part.run_dir)
    a, _ = _params(full.run_dir)
    b, _ = _params(done.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reference backend draws other views: other weights
    ref = pretrain(_cfg(tmp_path, "ref", "augment.backend=reference"))
    c, _ = _params(ref.run_dir)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    rows = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_persistent_loader_workers_give_the_views_of_the_in_process_loader(tmp_path):
    """Two loader processes kept alive across both epochs draw exactly the views that loading in
    the main process does (views are seeded per sample, the epoch travels with each key)."""
    inline = pretrain(_cfg(tmp_path, "w0", "data.num_workers=0"))
    workers = pretrain(_cfg(tmp_path, "w2", "data.num_workers=2"))
    assert inline.finished and workers.finished and workers.step == 12  # two epochs, one loader
    a, _ = _params(inline.run_dir)
    b, _ = _params(workers.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_saved_before_augment_semantics_resumes_and_evaluates_in_torchvision_semantics(tmp_path):
    """Runs written before ``augment.semantics`` existed trained with torchvision's ops: their saved
    config (config.yaml or the checkpoint's) without the key reads back as torchvision, so the resume
    continues the same augmentation and the evaluation uses the run's own transform."""
    import yaml

    from byol.config.resume import resumed_config
    from byol.eval.commands import load_checkpoint_run

    part = pretrain(_cfg(tmp_path, "old", "augment.semantics=torchvision", "train.max_steps=2"))
    saved = part.run_dir / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["augment"]["semantics"]
    saved.write_text(yaml.safe_dump(raw))
    assert resumed_config(part.run_dir).augment.semantics == "torchvision"
    assert load_config(None, []).augment.semantics == "official"  # a new run: the default
    ckpt = find_checkpoint(part.run_dir)
    sd = load_checkpoint(ckpt)
    del sd["extra"]["config"]["augment"]["semantics"]
    torch.save(sd, ckpt)  # an unsealed file, as older versions wrote
    assert load_checkpoint_run(ckpt).cfg.augment.semantics == "torchvision"
