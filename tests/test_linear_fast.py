"""Fast linear evaluation: the probe sweep on known problems, the feature cache and its
invalidation, and `fast_linear_command` end to end on a tiny pretraining run."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from byol.config import apply_overrides, config_from_dict
from byol.data.errors import DataError
from byol.eval.cache import cached_features
from byol.eval.knn import accuracy
from byol.eval.linear import fast_linear_command, fit_linear
from byol.train.checkpoint import atomic_save, find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY, write_shapes_folder

FAST = dict(epochs=20, lrs=(0.03, 0.3), weight_decays=(0.0, 1e-4), device="cpu")


def confounded(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes separable only by x0 - x1: a shared nuisance z (std 3) hides the label in
    x0, so the class-mean direction (what a vanishing lr learns) scores ~60 %, a fitted
    logistic regression 100 %. Four noise dims, all features offset from zero."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z = 3 * torch.randn(n, generator=g)
    x = torch.cat([(2 * y - 1 + z)[:, None], z[:, None], torch.randn(n, 4, generator=g)], 1)
    return x + 5, y


def test_fit_linear_solves_a_linear_problem_and_skips_absurd_lrs():
    (x, y), (vx, vy), (tx, ty) = confounded(400, 0), confounded(100, 1), confounded(500, 2)
    probe, info = fit_linear(x, y, vx, vy, num_classes=2, lrs=(1e-7, 0.1, 1e6), weight_decays=(1e-4,),
                             epochs=30, batch_size=64)
    assert info["lr"] == 0.1 and info["weight_decay"] == 1e-4
    tiny, good, huge = info["sweep"]
    assert good["val_top1"] == 100.0 and tiny["val_top1"] < 75  # class means only
    assert huge["val_top1"] == 0.0 and huge["val_loss"] is None  # lr x wd > 2: weights blew up
    with torch.no_grad():
        assert accuracy(probe(tx), ty) > 99


def test_fit_linear_is_deterministic_per_seed_and_scale_free():
    (x, y), (vx, vy) = confounded(300, 0), confounded(60, 1)
    kw = dict(num_classes=2, lrs=(0.05, 0.5), weight_decays=(0.0, 1e-3), epochs=5, batch_size=32)
    a, info_a = fit_linear(x, y, vx, vy, seed=1, **kw)
    b, info_b = fit_linear(x, y, vx, vy, seed=1, **kw)
    c, _ = fit_linear(x, y, vx, vy, seed=2, **kw)
    assert info_a == info_b and torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)  # another mini-batch order
    # standardisation: features x 1000 give the same probe (up to float rounding)
    s, info_s = fit_linear(1000 * x, y, 1000 * vx, vy, seed=1, **kw)
    assert [r["val_top1"] for r in info_s["sweep"]] == [r["val_top1"] for r in info_a["sweep"]]
    torch.testing.assert_close(s.linear.weight, a.linear.weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kw,needle", [
    (dict(lrs=()), "lrs"), (dict(lrs=(0.1, -1.0)), "lrs"), (dict(weight_decays=(-1e-4,)), "weight_decays"),
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(num_classes=1), "num_classes"),
    (dict(shift=1), "train_y must lie in"), (dict(n_val=0), "val_x must be"),
])
def test_fit_linear_bad_arguments(kw, needle):
    x, y = confounded(20, 0)
    y = y + kw.pop("shift", 0)
    n_val = kw.pop("n_val", 20)
    with pytest.raises(ValueError, match=needle):
        fit_linear(x, y, x[:n_val], y[:n_val], **{"num_classes": 2, "epochs": 1, **kw})


def test_cached_features_hit_miss_and_corrupt_file(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    data = TensorDataset(torch.randn(10, 3, 2, 2), torch.arange(10) % 3)
    parts = {"checkpoint_sha256": "a", "data": "d", "transform": "t"}
    first = cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts, batch_size=4)
    second = cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts, batch_size=4)
    assert not first.hit and second.hit and first.features.shape == (10, 5)
    assert torch.equal(first.features, second.features) and torch.equal(second.labels, torch.arange(10) % 3)
    assert encoder.training  # extraction ran BN in eval mode and restored the mode
    (stored,) = tmp_path.iterdir()
    assert stored.suffix == ".safetensors"  # no temp file left behind
    stored.write_bytes(stored.read_bytes()[:50])  # a crash-truncated or corrupt file
    again = cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts, batch_size=4)
    assert not again.hit and torch.equal(again.features, first.features)
    assert cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts).hit  # rewritten
    other = cached_features(encoder, data, cache_dir=tmp_path, key_parts={**parts, "data": "e"})
    assert not other.hit and len(list(tmp_path.iterdir())) == 2
    off = cached_features(encoder, data, cache_dir=None, key_parts=parts)
    assert not off.hit and torch.equal(off.features, first.features)


def _stored_features(path) -> torch.Tensor:
    return load_file(path)["features"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of BYOL on 64 shapes (16 held out): a run directory with a checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cfg = config_from_dict(apply_overrides({}, TINY + [
        "data.dataset=shapes", "data.shapes_size=64", "data.val_fraction=0.25", "optim.epochs=1",
        "eval.final_knn=false", f"train.out_dir={out}", "train.name=r"]))
    pretrain(cfg)
    return out / "r"


def test_heldout_json_cache_hits_and_checkpoint_change(tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    out = fast_linear_command(str(run), **FAST)
    written = json.loads((run / "eval" / "linear_fast_heldout.json").read_text())
    assert out["written_to"] == str(run / "eval" / "linear_fast_heldout.json")
    assert written["top1"] == out["top1"] and written["sweep"] == out["sweep"]
    assert 0 <= out["top1"] <= 100 and len(out["sweep"]) == 4
    assert out["n_train"] + out["n_val"] == 48 and out["n_test"] == 16 and out["num_classes"] == 8
    assert out["feature_dim"] == 64 and out["cache_hits"] == {"train": False, "test": False}
    assert out["lr"] in FAST["lrs"] and out["top1"] > 100 / 8  # better than chance
    again = fast_linear_command(str(run), **FAST)
    assert again["cache_hits"] == {"train": True, "test": True} and again["top1"] == out["top1"]
    # the checkpoint changes (as if trained on): both caches miss, the features are new
    cache = run / "eval" / "feature_cache"
    before = {len(f): f for f in map(_stored_features, cache.glob("*.safetensors"))}
    ckpt = find_checkpoint(run)
    sd = load_checkpoint(ckpt)
    sd["model"]["encoder.conv1.weight"] += 0.5 * torch.randn_like(sd["model"]["encoder.conv1.weight"])
    atomic_save(sd, ckpt)
    changed = fast_linear_command(str(run), **FAST)
    assert changed["cache_hits"] == {"train": False, "test": False}
    after = [_stored_features(p) for p in cache.glob("*.safetensors")]
    assert len(after) == 4 and sorted(before) == [16, 48]
    assert sum(torch.equal(f, before[len(f)]) for f in after) == 2  # only the old files match
    # the random-init floor: its own file and cache entries, deterministic in its seed
    floor = fast_linear_command(str(run), random_init=True, **FAST)
    assert floor["written_to"].endswith("linear_fast_heldout_random_init.json")
    assert floor["random_init"] and floor["cache_hits"] == {"train": False, "test": False}
    floor2 = fast_linear_command(str(run), random_init=True, **FAST)
    assert floor2["cache_hits"] == {"train": True, "test": True} and floor2["top1"] == floor["top1"]
    assert json.loads((run / "eval" / "linear_fast_heldout.json").read_text())["top1"] == changed["top1"]


def test_transfer_folders_and_data_changes(tiny_run, tmp_path):
    train = write_shapes_folder(tmp_path / "tr", n=30, classes=3)
    test = write_shapes_folder(tmp_path / "te", n=12, classes=3, size=24)
    ckpt = tmp_path / "bare.pt"  # a checkpoint outside its run: cache beside it, no json
    shutil.copy(find_checkpoint(tiny_run), ckpt)
    kw = dict(train=str(train), test=str(test), **FAST)
    out = fast_linear_command(str(ckpt), **kw)
    assert out["n_train"] + out["n_val"] == 30 and out["n_test"] == 12 and out["num_classes"] == 3
    assert out["train"] == str(train.resolve()) and "written_to" not in out
    assert 0 <= out["top1"] <= 100 and out["top5"] is None  # 3 classes: top-5 would say nothing
    assert len(list((tmp_path / "feature_cache").glob("*.safetensors"))) == 2
    assert fast_linear_command(str(ckpt), **kw)["cache_hits"] == {"train": True, "test": True}
    first = sorted(train.rglob("*.jpg"))[0]
    shutil.copy(first, first.with_name("added.jpg"))  # a file added
    assert fast_linear_command(str(ckpt), **kw)["cache_hits"] == {"train": False, "test": True}
    first.with_name("added.jpg").unlink()  # removed again: back to the first entry
    assert fast_linear_command(str(ckpt), **kw)["cache_hits"] == {"train": True, "test": True}
    Image.new("RGB", (24, 24), "white").save(sorted(test.rglob("*.jpg"))[0])  # a file rewritten
    assert fast_linear_command(str(ckpt), **kw)["cache_hits"] == {"train": True, "test": False}
    assert fast_linear_command(str(ckpt), cache=False, **kw)["cache_hits"] == {"train": False, "test": False}


@pytest.mark.parametrize("kw,needle", [
    (dict(val_fraction=0.0), "--val-fraction"), (dict(val_fraction=1.0), "--val-fraction"),
    (dict(lrs=[0.0]), "lrs"), (dict(weight_decays=[]), "weight_decays"), (dict(epochs=0), "epochs"),
    (dict(seed=-1), "--seed"), (dict(workers=-2), "--workers"), (dict(device="gpu0"), "--device"),
    (dict(train="somewhere"), "both --train and --test"),
])
def test_command_bad_arguments_are_one_line(tiny_run, kw, needle):
    with pytest.raises(ValueError, match=needle) as err:
        fast_linear_command(str(tiny_run), **{"device": "cpu", **kw})
    assert "\n" not in str(err.value)


def test_command_needs_a_validation_part(tiny_run, tmp_path):
    train = write_shapes_folder(tmp_path / "one", n=2, classes=2)  # one image per class
    with pytest.raises(DataError, match="too small"):
        fast_linear_command(str(tiny_run), train=str(train), test=str(train), device="cpu")
