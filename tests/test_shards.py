"""Tar shards (WebDataset layout): `byol shard` writes them, the reader splits and orders them
across ranks and workers, bad samples follow data.bad_files, and a run on shards resumes bitwise."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from byol.cli import main
from byol.config import load_config
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset
from byol.data.sampler import ResumableSampler
from byol.data.shards import ShardDataset, expand_shards, is_shard_path, shard_order
from byol.data.sources import open_images
from conftest import TINY, write_shapes_folder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet18.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 labelled JPEGs of 3 classes as 3 shards of 16."""
    root = tmp_path_factory.mktemp("shards")
    write_shapes_folder(root / "images", n=48)
    assert main(["shard", str(root / "images"), "--out", str(root / "out"), "--shard-size", "16"]) == 0
    return root


def _pattern(root: Path) -> str:
    return str(root / "out" / "train-{000000..000002}.tar")


def test_byol_shard_writes_shards_and_a_manifest(shards):
    out = shards / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"train-{k:06d}.tar" for k in range(3)]
    assert [s["samples"] for s in manifest["shards"]] == [16, 16, 16] and manifest["total"] == 48
    folder = ImageFolderDataset(shards / "images")
    assert manifest["classes"] == folder.classes == ["circle", "square", "triangle"]
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    # every file's bytes are in exactly one shard, with its class as .cls
    by_bytes = {p.read_bytes(): label for p, label in zip(folder.files, folder.labels)}
    seen = []
    for s in manifest["shards"]:
        with tarfile.open(out / s["name"]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".jpg"):
                assert int(members[name.replace(".jpg", ".cls")].decode()) == by_bytes[data]
                seen.append(data)
    assert sorted(seen) == sorted(by_bytes)
    # a shard mixes the classes (written in a seeded permutation)
    ds = ShardDataset(_pattern(shards))
    assert len({ds.labels[i] for i in range(16)}) == 3
    assert not list(out.glob("*.tmp"))


def test_the_manifest_index_is_what_the_tar_headers_say(shards, tmp_path):
    import shutil

    for p in (shards / "out").glob("*.tar"):  # the same shards without a manifest: headers walked
        shutil.copy(p, tmp_path / p.name)
    from_manifest, from_tar = ShardDataset(_pattern(shards)), ShardDataset(str(tmp_path / "train-{000000..000002}.tar"))
    assert from_manifest.samples == from_tar.samples and from_manifest.labels == from_tar.labels
    assert from_tar.classes == ["0", "1", "2"] and from_manifest.classes == ["circle", "square", "triangle"]
    assert torch.equal(from_manifest[5][0], from_tar[5][0])


def test_byol_shard_refuses_a_missing_folder_and_a_full_out(shards, tmp_path, capsys):
    assert main(["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["shard", str(shards / "images"), "--out", str(shards / "out")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "again"
    assert main(["shard", str(shards / "images"), "--out", str(out), "--shard-size", "30"]) == 0
    assert main(["shard", str(shards / "images"), "--out", str(out), "--shard-size", "48", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]


def test_shard_paths_are_detected_and_expanded(shards):
    out = shards / "out"
    assert is_shard_path(_pattern(shards)) and is_shard_path(out) and is_shard_path(out / "train-000001.tar")
    assert not is_shard_path(shards / "images")
    assert expand_shards(_pattern(shards)) == expand_shards(out) == sorted(out.glob("*.tar"))
    with pytest.raises(DataError, match="shard not found: .*train-000003.tar"):
        expand_shards(str(out / "train-{000000..000003}.tar"))
    cfg = load_config(None, [f"data.path={out}", "data.format=folder"])
    with pytest.raises(DataError, match="no images"):  # format=folder: not read as shards
        open_images(cfg.data)
    assert len(open_images(load_config(None, [f"data.path={out}"]).data)) == 48


def test_shards_read_back_every_image_once_per_epoch_across_ranks_and_workers(shards):
    ds = ShardDataset(_pattern(shards))
    folder = ImageFolderDataset(shards / "images")
    want = sorted(bytes(folder[i][0].flatten().tolist()) for i in range(len(folder)))
    order = lambda e: shard_order(ds.shard_of, 7, e, buffer=6)  # noqa: E731
    for epoch in (0, 1):
        got = []
        for rank in (0, 1):
            sampler = ResumableSampler(len(ds), seed=7, rank=rank, world_size=2, batch_size=8, order=order)
            sampler.set_epoch(epoch)
            keys = [i for _, i in sampler]
            loader = DataLoader(_Indexed(ds), batch_size=4, sampler=keys, num_workers=2)
            batches = [b for b in loader]
            assert torch.cat([b[1] for b in batches]).tolist() == keys  # the sampler's order, both workers
            got += [bytes(img.flatten().tolist()) for b in batches for img in b[0]]
        assert sorted(got) == want  # 48 = 6 global batches of 8: no image lost, none twice


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0], i


def test_the_shard_order_is_seeded_and_keeps_to_a_few_shards_at_a_time():
    shard_of = [k // 100 for k in range(1000)]  # 10 shards of 100
    a, b = shard_order(shard_of, 1, 0, 50), shard_order(shard_of, 1, 0, 50)
    assert a == b and sorted(a) == list(range(1000))
    assert a != shard_order(shard_of, 1, 1, 50) and a != shard_order(shard_of, 2, 0, 50)
    assert a != sorted(a)
    # reads stay local: >= 90 of any 100 consecutive samples come from 3 shards (buffer 50 < shard size)
    for s in range(0, 900, 50):
        counts = Counter(shard_of[j] for j in a[s:s + 100])
        assert sum(c for _, c in counts.most_common(3)) >= 90, (s, counts)
    firsts = shard_order(shard_of, 1, 0, 1)  # buffer 1: whole shards, each in file order
    assert all(firsts[s:s + 100] == list(range(firsts[s], firsts[s] + 100)) for s in range(0, 1000, 100))
    assert [firsts[s] // 100 for s in range(0, 1000, 100)] != list(range(10))  # in a shuffled shard order


def _damaged_shards(root: Path) -> Path:
    """The shards of a folder plus a shard holding a truncated JPEG, an empty one and a bad label."""
    images = root / "images"
    write_shapes_folder(images, n=12)
    out = root / "out"
    assert main(["shard", str(images), "--out", str(out), "--shard-size", "6"]) == 0
    good = next(images.rglob("*.jpg")).read_bytes()
    members = {"train-000002.tar": [("a.jpg", good), ("a.cls", b"1"), ("b.jpg", good[: len(good) // 2]),
                                    ("b.cls", b"0"), ("c.jpg", b""), ("c.cls", b"2")],
               "train-000003.tar": [("d.jpg", good), ("d.cls", b"cat"), ("e.cls", b"1")]}
    for shard, files in members.items():
        with tarfile.open(out / shard, "w") as tf:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


def test_bad_samples_are_skipped_and_listed_or_fail_naming_shard_and_member(tmp_path):
    out = _damaged_shards(tmp_path)
    pattern = str(out / "train-{000000..000003}.tar")
    ds = ShardDataset(pattern)  # skip: the bad label and the lone .cls at opening, the bad images when loaded
    assert len(ds) == 12 + 3
    assert ds.skipped == [(f"{out / 'train-000003.tar'}:d.cls", "label is not a non-negative integer: 'cat'"),
                          (f"{out / 'train-000003.tar'}:e", "no image member (has cls)")]
    images = [ds[i][0] for i in range(len(ds))]
    assert all(img.shape == (3, 20, 20) for img in images)
    where = [w for w, _ in ds.skipped[2:]]
    assert where == [f"{out / 'train-000002.tar'}:b.jpg", f"{out / 'train-000002.tar'}:c.jpg"]
    assert "truncated JPEG" in ds.skipped[2][1] and ds.skipped[3][1] == "empty file"
    with pytest.raises(DataError, match=r"bad sample .*train-000003.tar:d.cls: label is not"):
        ShardDataset(pattern, bad_files="fail")
    full = ShardDataset(pattern, verify="full")  # decoded up front: only good samples remain
    assert len(full) == 13 and len(full.skipped) == 4
    loose = ShardDataset(str(out / "train-000002.tar"), bad_files="fail")
    with pytest.raises(DataError, match=r"bad sample .*train-000002.tar:b.jpg: truncated JPEG") as e:
        [loose[i] for i in range(len(loose))]
    assert "\n" not in str(e.value)


def test_bad_samples_in_shards_are_listed_in_the_runs_skipped_files(tmp_path):
    out = _damaged_shards(tmp_path)
    args = ["pretrain", "--config", str(CONFIG), *TINY, f"data.path={out}", "data.val_fraction=0",
            "optim.batch_size=4", "train.max_steps=5", f"train.out_dir={tmp_path}", "train.name=bad",
            "eval.final_knn=false", "eval.initial_knn=false", "eval.online_linear=false"]
    assert main(args) == 0
    lines = (tmp_path / "bad" / "skipped_files.tsv").read_text().splitlines()
    assert lines[0] == f"{out / 'train-000003.tar'}:d.cls\tlabel is not a non-negative integer: 'cat'"
    assert len(lines) == 4 and lines[2].startswith(f"{out / 'train-000002.tar'}:b.jpg\ttruncated JPEG")


def _pretrain(tmp_path, root, name, *extra):
    # 48 images, 25% held out per class (36 train), batch 8 -> 4 steps an epoch, 2 epochs
    return ["pretrain", "--config", str(CONFIG), *TINY, f"data.path={_pattern(root)}", "augment.backend=batched",
            "data.val_fraction=0.25", "data.shuffle_buffer=10", f"train.out_dir={tmp_path}", f"train.name={name}",
            "train.checkpoint_every=100", *extra]


def test_pretrain_on_shards_stops_and_resumes_bitwise(shards, tmp_path):
    from byol.train.checkpoint import find_checkpoint, load_checkpoint

    assert main(_pretrain(tmp_path, shards, "full", "data.num_workers=2")) == 0  # the views do not depend on workers
    assert main(_pretrain(tmp_path, shards, "split", "train.max_steps=3")) == 0  # inside epoch 0
    part = load_checkpoint(find_checkpoint(tmp_path / "split"))
    assert (part["epoch"], part["step_in_epoch"]) == (0, 3)
    assert main(["pretrain", "--resume", str(tmp_path / "split")]) == 0
    a, b = (load_checkpoint(find_checkpoint(tmp_path / n)) for n in ("full", "split"))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "split")}
    losses = {n: [(r["step"], r["loss"]) for r in rs if "loss" in r] for n, rs in rows.items()}
    assert losses["split"] == losses["full"] and [s for s, _ in losses["full"]] == list(range(1, 9))
    knn = json.loads((tmp_path / "full" / "eval" / "knn.json").read_text())  # labels from .cls: held-out kNN
    assert (knn["n_bank"], knn["n_test"]) == (36, 12)
