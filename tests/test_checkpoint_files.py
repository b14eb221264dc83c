"""Checkpoint files: damage is detected (never half-loaded), last.pt rotates to previous.pt, a
resume falls back to the newest checkpoint that verifies, and no command runs a pickle payload."""
from __future__ import annotations

import errno
import os
import random

import pytest
import torch

from byol.cli import main
from byol.config import load_config
from byol.data.errors import DataError
from byol.eval.cache import cache_key, cached_features
from byol.train import checkpoint
from byol.train.checkpoint import CheckpointWriteError, load_checkpoint, load_newest, save_checkpoint
from byol.train.pretrain import pretrain
from conftest import TINY, write_shapes_folder


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(3, dtype=torch.bfloat16),
                      "n": torch.tensor(step)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "step": step, "epoch": 0, "step_in_epoch": step,
            "rng": {"python": (3, tuple(range(5)), None)}, "extra": {"config": {"a": [1, 2.5, "x"]}}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_a_sealed_checkpoint_loads_back_equal_and_plain_torch_load_reads_it(tmp_path):
    save_checkpoint(_state(7), tmp_path)
    assert _equal(load_checkpoint(tmp_path / "last.pt"), _state(7))
    raw = torch.load(tmp_path / "last.pt", weights_only=True)  # a user's own torch.load works too
    assert raw["step"] == 7 and raw["integrity"]["algorithm"] == "sha256-content-v1"


def test_every_flipped_byte_is_detected_or_harmless(tmp_path):
    save_checkpoint(_state(3), tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    rng = random.Random(0)
    detected = 0
    positions = rng.sample(range(len(good)), 150)
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        try:
            loaded = load_checkpoint(tmp_path / "x.pt", bytes(bad))
        except DataError:
            detected += 1
            continue
        assert _equal(loaded, _state(3)), pos  # loaded only when the content is unchanged
    # the tensor bytes are most of the file: most flips hit them and must be caught
    assert detected > 100


def test_a_flipped_bit_inside_a_tensor_is_caught_by_the_digest(tmp_path):
    save_checkpoint(_state(3), tmp_path)
    data = bytearray((tmp_path / "last.pt").read_bytes())
    w = _state(3)["model"]["w"].numpy().tobytes()
    at = bytes(data).find(w[:64])  # the tensor's storage, stored raw inside the zip
    assert at > 0
    data[at + 1000] ^= 0x04
    # torch alone loads it without complaint (its zip reader skips the CRC) ...
    assert not torch.equal(torch.load(__import__("io").BytesIO(bytes(data)), weights_only=True)["model"]["w"],
                           _state(3)["model"]["w"])
    with pytest.raises(DataError, match="is damaged: its content does not match its integrity digest"):
        load_checkpoint(tmp_path / "last.pt", bytes(data))  # ... the digest does not


def test_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(_state(3), tmp_path)
    path = tmp_path / "last.pt"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match="truncated or damaged"):
        load_checkpoint(path)


def test_saves_rotate_last_to_previous_and_keep_epoch_links(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, keep_as="epoch_0001.pt" if step == 2 else None)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert load_checkpoint(tmp_path / "previous.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "epoch_0001.pt")["step"] == 2  # survives later rotations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "last.pt", "previous.pt"]


def test_a_failed_write_leaves_both_checkpoints_untouched(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="no space left on device; .*last.pt is intact"):
        save_checkpoint(_state(3), tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file either


def test_newest_that_verifies_wins_and_epochs_count(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(_state(step), ckpt, keep_as="epoch_0001.pt" if step == 4 else None)
    save_checkpoint(_state(6), ckpt)  # last 6, previous 4, epoch_0001 4
    (ckpt / "last.pt").write_bytes(b"garbage")
    (ckpt / "previous.pt").write_bytes((ckpt / "previous.pt").read_bytes()[:100])
    loaded = load_newest(tmp_path)
    assert loaded.path.name == "epoch_0001.pt" and loaded.state["step"] == 4
    assert [p.name for p, _ in loaded.passed_over] == ["last.pt", "previous.pt"]
    (ckpt / "epoch_0001.pt").unlink()
    with pytest.raises(DataError, match="no checkpoint of .* loads: .*last.pt .*previous.pt"):
        load_newest(tmp_path)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0",
                              f"train.out_dir={tmp_path}", f"train.name={name}", "train.checkpoint_every=2",
                              "eval.final_knn=false", *extra])


def test_resume_passes_over_a_damaged_last_pt_and_still_ends_bitwise_equal(tmp_path, capsys):
    full = pretrain(_cfg(tmp_path, "full"))
    part = pretrain(_cfg(tmp_path, "split", "train.max_steps=5"))  # checkpoints at 2, 4 and the stop at 5
    last = part.run_dir / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x20  # a flipped bit somewhere in the middle
    last.write_bytes(bytes(data))
    capsys.readouterr()
    done = pretrain(_cfg(tmp_path, "split"), resume=part.run_dir)
    err = capsys.readouterr().err
    assert done.finished and done.resumed_from.name == "previous.pt"
    assert "last.pt" in err and "resumed from previous.pt (step 4)" in err
    assert (part.run_dir / "checkpoints" / "last.pt.damaged").is_file()  # kept aside, not rotated
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(done.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def hostile_run(tmp_path):
    """A finished run whose last.pt was replaced by a file that runs code when unpickled."""
    run = pretrain(_cfg(tmp_path, "run", "optim.epochs=1")).run_dir
    marker = tmp_path / "payload_ran"
    sd = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    sd["extra"]["hook"] = _Payload(marker)
    torch.save(sd, run / "checkpoints" / "last.pt")
    (run / "checkpoints" / "previous.pt").unlink()
    return run, marker


@pytest.mark.parametrize("command", [
    ["eval", "knn", "{run}"],
    ["export", "{run}", "--out", "{tmp}/enc.safetensors"],
    ["embed", "{run}", "{tmp}/images", "--out", "{tmp}/emb.npy"],
    ["pretrain", "--resume", "{run}"],
])
def test_no_command_runs_a_pickle_payload(hostile_run, tmp_path, capsys, command):
    run, marker = hostile_run
    write_shapes_folder(tmp_path / "images", n=6, classes=2)
    args = [a.format(run=run, tmp=tmp_path) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused: it holds pickled Python objects" in err, err
    assert not marker.exists()


def test_report_never_unpickles_a_checkpoint(hostile_run):
    run, marker = hostile_run
    assert main(["report", str(run)]) == 0
    assert not marker.exists()


def test_a_pickle_in_the_feature_cache_is_never_run(tmp_path):
    marker = tmp_path / "payload_ran"
    parts = {"who": "test"}
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"features": _Payload(marker)}, cache / f"{cache_key(parts)}.safetensors")
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8), torch.arange(4))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5))
    out = cached_features(encoder, data, cache_dir=cache, key_parts=parts)
    assert not out.hit and out.features.shape == (4, 5)  # recomputed, and the file replaced
    assert not marker.exists()
    assert cached_features(encoder, data, cache_dir=cache, key_parts=parts).hit


def test_an_unreadable_checkpoint_is_not_taken_for_damage(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(_state(2), ckpt)
    save_checkpoint(_state(4), ckpt)
    real_load = torch.load

    def io_error(f, *args, **kwargs):  # the disk (or the network) fails while reading last.pt
        if str(f).endswith("last.pt") and not kwargs.get("mmap"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", io_error)
    with pytest.raises(DataError, match="cannot read .*last.pt: Input/output error"):
        load_newest(tmp_path)  # no silent fall back to previous.pt past an intact last.pt
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "previous.pt"]


def test_a_full_disk_when_resuming_is_one_line_and_exit_4(tmp_path, monkeypatch, capsys):
    run = pretrain(_cfg(tmp_path, "run", "train.max_steps=3")).run_dir
    from byol.train import pretrain as pretrain_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pretrain_module, "truncate_metrics", disk_full)  # the first write of a resume
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on device" in err and "are intact" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
