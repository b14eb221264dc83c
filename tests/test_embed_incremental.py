"""`byol embed` and the feature cache write their rows as they come: a memory-mapped file filled
batch by batch (never the full [N, D] array in memory), renamed into place when complete; a
stopped `byol embed` resumes where its last progress record says, and only under the same
encoder, images and transform."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import byol.embed
import byol.eval.cache
from byol.cli import main
from byol.data.decode import decode_image
from byol.data.errors import DataError
from byol.embed import embed_folder, encoder_transform
from byol.eval.cache import cache_key, cached_features
from byol.eval.features import extract_features
from conftest import add_bad_files

SIZE = 8
META = {"image_size": SIZE, "eval_crop_fraction": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "augment_semantics": "torchvision"}


class Stub(nn.Module):
    """A fixed random linear map: image [B, 3, 8, 8] -> features [B, dim]; equal seeds, equal weights."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * SIZE * SIZE, dim)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=g))
            self.linear.bias.copy_(torch.randn(self.linear.bias.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def use_stub(monkeypatch, dim: int = 16, seed: int = 0) -> None:
    monkeypatch.setattr(byol.embed, "_open_encoder", lambda source, device: (Stub(dim, seed).to(device), META))


def write_images(root: Path, n: int) -> Path:
    """n distinct 8x8 PNGs in two class folders: i odd in a/, i even in b/, named {i:05d}.png."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def undecodable(monkeypatch, *numbers: int) -> None:
    """The images numbered ``numbers`` pass the folder's quick check but fail to decode."""
    names = {f"{i:05d}.png" for i in numbers}
    real = byol.embed.decode_image

    def decode(path):
        if Path(path).name in names:
            raise DataError(f"{path}: corrupt image data")
        return real(path)

    monkeypatch.setattr(byol.embed, "decode_image", decode)


def direct(images: Path, files: list[str], dim: int = 16, seed: int = 0) -> np.ndarray:
    """The stub's features [len(files), dim] of each file, one at a time, without byol embed."""
    tf, enc = encoder_transform(META), Stub(dim, seed).eval()
    with torch.no_grad():
        return torch.cat([enc(tf(decode_image(images / f))[None]) for f in files]).numpy()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".progress.json", ".tmp")))


def stop_after(monkeypatch, k: int) -> None:
    """Make the next embed raise KeyboardInterrupt when batch k+1 is asked for."""
    real = byol.embed.iter_features

    def stopping(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == k:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(byol.embed, "iter_features", stopping)


def test_rows_are_the_encoder_features_and_bad_files_are_dropped(tmp_path, monkeypatch):
    use_stub(monkeypatch)
    images = write_images(tmp_path / "images", 11)
    undecodable(monkeypatch, 4)
    bad = add_bad_files(images)
    out = tmp_path / "emb" / "emb.npy"
    info = embed_folder("stub", images, out, batch_size=3, device="cpu", workers=0, progress=False, save_every=1)
    files = (tmp_path / "emb" / "emb.files.txt").read_text().splitlines()
    good = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png") if p.name != "00004.png")
    emb = np.load(out)
    assert files == good and emb.shape == (10, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, direct(images, files), atol=1e-4, rtol=1e-5)
    assert {s[0] for s in info["skipped"]} == {str(p) for p in [*bad, images / "b" / "00004.png"]}
    labels = json.loads((tmp_path / "emb" / "emb.labels.json").read_text())
    assert [labels["classes"][k] for k in labels["labels"]] == [f.split("/")[0] for f in files]
    assert leftovers(tmp_path / "emb") == [] and info["resumed_at"] is None
    undecodable(monkeypatch, *range(11))
    with pytest.raises(DataError, match="no image under .* could be decoded"):
        embed_folder("stub", images, out, batch_size=3, device="cpu", workers=0, progress=False, save_every=1)
    assert leftovers(tmp_path / "emb") == []


def test_the_full_array_is_never_in_memory(tmp_path, monkeypatch):
    """N x D = 1200 x 4096 float32 (19.7 MB): the rows go to a memmap as they come (the yielded
    batches are not kept) and the compaction that drops a bad row copies in small chunks."""
    n, dim = 1200, 4096
    use_stub(monkeypatch, dim)
    monkeypatch.setattr(byol.embed, "COPY_CHUNK_BYTES", 1 << 16)
    images = write_images(tmp_path / "images", n)
    undecodable(monkeypatch, 15)  # row 7: a/00015.png (a/ holds the odd numbers)
    real, alive = byol.embed.iter_features, []

    def watched(*args, **kwargs):
        for feats, ids in real(*args, **kwargs):
            alive.append(weakref.ref(feats))
            yield feats, ids

    monkeypatch.setattr(byol.embed, "iter_features", watched)
    out = tmp_path / "emb.npy"
    tracemalloc.start()
    try:
        embed_folder("stub", images, out, batch_size=50, device="cpu", workers=0, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(alive) == 24 and sum(r() is not None for r in alive) <= 1  # no batch accumulated
    assert peak < n * dim * 4 / 10, peak  # measured: 0.9 MB, mostly the 1200 paths
    emb = np.load(out, mmap_mode="r")
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert emb.shape == (n - 1, dim) and files[6:8] == ["a/00013.png", "a/00017.png"]
    pick = [0, 6, 7, 500, n - 2]  # around the dropped row 7
    np.testing.assert_allclose(emb[pick], direct(images, [files[i] for i in pick], dim), atol=1e-4, rtol=1e-5)


def test_a_stopped_run_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    use_stub(monkeypatch)
    images = write_images(tmp_path / "images", 23)
    undecodable(monkeypatch, 2, 20)
    kw = dict(batch_size=4, device="cpu", workers=0, progress=False, save_every=2)
    embed_folder("stub", images, tmp_path / "ref.npy", **kw)
    out = tmp_path / "out" / "emb.npy"
    with monkeypatch.context() as m:
        stop_after(m, 5)  # progress recorded after batches 2 and 4: 16 rows final
        with pytest.raises(KeyboardInterrupt):
            embed_folder("stub", images, out, **kw)
    assert not out.exists() and not (tmp_path / "out" / "emb.files.txt").exists()
    assert leftovers(tmp_path / "out") == ["emb.npy.partial", "emb.npy.progress.json"]
    state = json.loads((tmp_path / "out" / "emb.npy.progress.json").read_text())
    assert state["rows_done"] == 16 and state["failed"] == [12]  # b/00002.png: a/ holds 11 files
    capsys.readouterr()
    info = embed_folder("stub", images, out, **kw)
    assert "resuming at row 16 of 23" in capsys.readouterr().err and info["resumed_at"] == 16
    assert np.array_equal(np.load(out), np.load(tmp_path / "ref.npy"))
    assert (tmp_path / "out" / "emb.files.txt").read_text() == (tmp_path / "ref.files.txt").read_text()
    assert info["n"] == 21 and leftovers(tmp_path / "out") == []


def test_another_encoder_or_folder_or_no_resume_starts_over(tmp_path, monkeypatch, capsys):
    images = write_images(tmp_path / "images", 10)
    kw = dict(batch_size=2, device="cpu", workers=0, progress=False, save_every=1)
    out = tmp_path / "emb.npy"

    def interrupted(seed: int = 0) -> None:
        with monkeypatch.context() as m:
            use_stub(m, seed=seed)
            stop_after(m, 3)
            with pytest.raises(KeyboardInterrupt):
                embed_folder("stub", images, out, **kw)
        assert (tmp_path / "emb.npy.progress.json").is_file()
        capsys.readouterr()

    interrupted(seed=0)
    use_stub(monkeypatch, seed=1)  # other weights
    info = embed_folder("stub", images, out, **kw)
    err = capsys.readouterr().err
    assert "starting over" in err and err.count("\n") == 1 and info["resumed_at"] is None
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    np.testing.assert_allclose(np.load(out), direct(images, files, seed=1), atol=1e-4, rtol=1e-5)

    interrupted(seed=1)
    write_images(tmp_path / "more", 1)
    os.replace(tmp_path / "more" / "b" / "00000.png", images / "b" / "zzz.png")  # the folder changed
    info = embed_folder("stub", images, out, **kw)
    assert "starting over" in capsys.readouterr().err and info["n"] == 11 and info["resumed_at"] is None

    interrupted(seed=1)
    assert main(["embed", "stub", str(images), "--out", str(out), "--no-progress", "--no-resume",
                 "--batch-size", "2", "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "--no-resume" in captured.err and "resuming" not in captured.err and leftovers(tmp_path) == []
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    np.testing.assert_allclose(np.load(out), direct(images, files, seed=1), atol=1e-4, rtol=1e-5)


_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, os.environ["TESTS_DIR"])
    import byol.embed
    from test_embed_incremental import META, Stub
    byol.embed._open_encoder = lambda source, device: (Stub().to(device), META)
    real = byol.embed.iter_features

    def killed(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 5:  # SIGKILL while batch 6 is computed: progress was written after batch 4
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    byol.embed.iter_features = killed
    byol.embed.embed_folder.__kwdefaults__["save_every"] = 2  # progress recorded every 2 batches
    from byol.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_sigkilled_process_resumes_to_the_same_array(tmp_path, monkeypatch, capsys):
    images = write_images(tmp_path / "images", 30)
    out = tmp_path / "emb.npy"
    args = ["embed", "stub", str(images), "--out", str(out), "--batch-size", "4", "--device", "cpu",
            "--workers", "0", "--no-progress"]
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()  # never a complete-looking partial result
    assert leftovers(tmp_path) == ["emb.npy.partial", "emb.npy.progress.json"]
    use_stub(monkeypatch)
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming at row 16 of 30" in capsys.readouterr().err
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert len(files) == 30
    np.testing.assert_allclose(np.load(out), direct(images, files), atol=1e-4, rtol=1e-5)
    assert leftovers(tmp_path) == []


def test_the_feature_cache_is_written_batch_by_batch_and_atomically(tmp_path, monkeypatch):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    data = TensorDataset(torch.randn(21, 3, 2, 2), torch.arange(21) % 4)
    parts = {"checkpoint_sha256": "a", "data": "d", "transform": "t"}
    real, alive = byol.eval.cache.iter_features, []

    def watched(*args, **kwargs):
        for feats, labels in real(*args, **kwargs):
            alive.append(weakref.ref(feats))
            yield feats, labels

    monkeypatch.setattr(byol.eval.cache, "iter_features", watched)
    got = cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts, batch_size=4)
    assert len(alive) == 6 and sum(r() is not None for r in alive) <= 1  # no batch accumulated
    want, labels = extract_features(encoder, data, batch_size=4)
    assert not got.hit and torch.equal(got.features, want) and torch.equal(got.labels, labels.long())
    stored = load_file(tmp_path / f"{cache_key(parts)}.safetensors")  # a plain safetensors file
    assert torch.equal(stored["features"], want) and stored["labels"].dtype == torch.int64
    assert cached_features(encoder, data, cache_dir=tmp_path, key_parts=parts).hit

    def broken(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(byol.eval.cache, "iter_features", broken)
    other = {**parts, "data": "e"}
    with pytest.raises(KeyboardInterrupt):
        cached_features(encoder, data, cache_dir=tmp_path, key_parts=other, batch_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{cache_key(parts)}.safetensors"]
