"""Nothing dropped in silence: every skipped sample reaches the run's skipped_files.tsv (from
loader workers and from every rank), a shard set is checked against its manifest, and every bad
member is named under data.bad_files=fail."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from byol.cli import main
from byol.config import load_config
from byol.data.errors import DataError
from byol.data.shards import ShardDataset
from conftest import TINY, write_shapes_folder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet18.yaml"


def _late_bad_shards(root: Path) -> tuple[Path, list[str]]:
    """Two shards of 6 good JPEGs from `byol shard`, plus a tar of two good samples and two whose
    images fail only when decoded (a cut JPEG, an empty file): 16 samples. -> (folder, the two)."""
    images = root / "images"
    write_shapes_folder(images, n=12)
    out = root / "out"
    assert main(["shard", str(images), "--out", str(out), "--shard-size", "6"]) == 0
    good = next(images.rglob("*.jpg")).read_bytes()
    extra = out / "train-000002.tar"
    with tarfile.open(extra, "w") as tf:
        for name, data in [("a.jpg", good), ("a.cls", b"1"), ("b.jpg", good[: len(good) // 2]), ("b.cls", b"0"),
                           ("c.jpg", b""), ("c.cls", b"2"), ("d.jpg", good), ("d.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out, [f"{extra}:b.jpg", f"{extra}:c.jpg"]


def _late_bad_folder(root: Path) -> tuple[Path, list[str]]:
    """20 good JPEGs and a PNG that passes the quick check but does not decode: 21 images."""
    folder = write_shapes_folder(root / "images", n=20, classes=2)
    png = folder / "circle" / "zz_corrupt.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 60)).save(png)
    data = bytearray(png.read_bytes())
    data[40:60] = b"\x00" * 20  # the image data damaged, header and IEND kept
    png.write_bytes(bytes(data))
    return folder, [str(png)]


def _run_args(tmp_path: Path, data: Path, name: str, batch: int, *extra: str) -> list[str]:
    # one epoch of batch x 3 steps reads every image (val_fraction 0: none held out)
    return ["pretrain", "--config", str(CONFIG), *TINY, f"data.path={data}", "data.val_fraction=0",
            f"optim.batch_size={batch}", "train.max_steps=3", f"train.out_dir={tmp_path}", f"train.name={name}",
            "eval.final_knn=false", "eval.initial_knn=false", "eval.online_linear=false", *extra]


@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_samples_skipped_inside_loader_workers_reach_skipped_files_tsv(tmp_path, kind):
    data, late = (_late_bad_shards if kind == "shards" else _late_bad_folder)(tmp_path)
    batch = 8 if kind == "shards" else 7  # 16 or 21 images: the first 2 or 3 steps read each once
    assert main(_run_args(tmp_path, data, "w2", batch, "data.num_workers=2")) == 0
    run = tmp_path / "w2"
    listed = [line.split("\t")[0] for line in (run / "skipped_files.tsv").read_text().splitlines()]
    assert sorted(listed) == sorted(late)
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == len(late)
    assert not (run / ".skipped").exists()  # the workers' records are in skipped_files.tsv now
    # the same records as without workers
    assert main(_run_args(tmp_path, data, "w0", batch, "data.num_workers=0")) == 0
    assert sorted((tmp_path / "w0" / "skipped_files.tsv").read_text().splitlines()) == \
        sorted((run / "skipped_files.tsv").read_text().splitlines())


def _rank_worker(rank: int, port: int, cfg) -> None:
    from test_distributed import _pretrain_worker

    _pretrain_worker(rank, port, [(cfg, None)])


def test_samples_skipped_on_every_rank_reach_rank_0s_list(tmp_path):
    from test_distributed import _free_port

    data, late = _late_bad_shards(tmp_path)
    # 16 samples, global batch 8 (4 a rank): the 2 steps of an epoch read every sample on one rank or the other
    args = [*TINY, f"data.path={data}", "data.val_fraction=0", "optim.batch_size=8", "optim.epochs=1",
            "data.num_workers=1", f"train.out_dir={tmp_path}", "train.name=ddp", "eval.final_knn=false",
            "eval.initial_knn=false", "eval.online_linear=false", "train.device=cpu"]
    cfg = load_config(CONFIG, args)
    mp.spawn(_rank_worker, args=(_free_port(), cfg), nprocs=2, join=True)
    listed = [line.split("\t")[0] for line in (tmp_path / "ddp" / "skipped_files.tsv").read_text().splitlines()]
    assert sorted(listed) == sorted(late)


# --- shards against their manifest --------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """80 labelled JPEGs of 4 classes as 4 shards of 20, with a manifest."""
    root = tmp_path_factory.mktemp("set")
    write_shapes_folder(root / "images", n=80, classes=4)
    assert main(["shard", str(root / "images"), "--out", str(root / "out"), "--shard-size", "20"]) == 0
    return root / "out"


def _copy(shard_set: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_set, out)
    return out


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _drop_from_index(sl: slice):
    def edit(manifest):
        entry = manifest["shards"][1]
        for key in ("names", "offsets", "sizes", "labels"):
            del entry["index"][key][sl]
        entry["samples"] = len(entry["index"]["names"])
        manifest["total"] = sum(e["samples"] for e in manifest["shards"])
    return edit


def test_an_intact_set_is_read_from_its_manifest_and_says_so(shard_set):
    ds = ShardDataset(shard_set)
    assert len(ds) == 80 and ds.skipped == [] and ds.listed_samples == 80
    assert ds.describe() == f"80 samples in 4 shards, of the 80 that {shard_set / 'manifest.json'} lists"
    assert len(ShardDataset(shard_set, verify="full")) == 80  # the sha256 of every shard agrees


@pytest.mark.parametrize("sl", [slice(15, None), slice(5, 10)], ids=["last-five", "five-in-the-middle"])
def test_a_manifest_index_that_lists_fewer_samples_than_its_tar_is_never_a_smaller_epoch(shard_set, tmp_path, sl):
    out = _copy(shard_set, tmp_path)
    _edit_manifest(out, _drop_from_index(sl))  # the manifest now lists 75 of the 80 samples
    ds = ShardDataset(out)  # skip: the tar is read as it is, and the disagreement is listed
    assert len(ds) == 80
    ((where, reason),) = ds.skipped
    assert where == str(out / "train-000001.tar") and "disagrees with manifest.json" in reason
    assert "the tar holds 20 usable samples, manifest.json's index lists 15" in reason
    with pytest.raises(DataError, match=r"train-000001.tar: disagrees with manifest.json") as e:
        ShardDataset(out, bad_files="fail")
    assert "\n" not in str(e.value)


def test_a_shard_the_manifest_lists_but_the_folder_lacks_is_named_and_counted(shard_set, tmp_path, capsys):
    out = _copy(shard_set, tmp_path)
    (out / "train-000002.tar").unlink()
    ds = ShardDataset(out)
    assert len(ds) == 60
    assert ds.skipped == [(str(out / "train-000002.tar"), "missing shard: manifest.json lists it with 20 samples")]
    assert ds.describe().startswith(f"60 samples in 3 shards, of the 80 that {out / 'manifest.json'} lists")
    with pytest.raises(DataError, match=r"train-000002.tar: missing shard: manifest.json lists it with 20"):
        ShardDataset(out, bad_files="fail")
    # through a run: the start summary says 60 of 80, skipped_files.tsv and summary.json count it
    capsys.readouterr()
    assert main(_run_args(tmp_path, out, "miss", 8)) == 0
    printed = capsys.readouterr().out
    assert "shards: 60 samples in 3 shards, of the 80 that" in printed
    tsv = (tmp_path / "miss" / "skipped_files.tsv").read_text()
    assert tsv == f"{out / 'train-000002.tar'}\tmissing shard: manifest.json lists it with 20 samples\n"
    assert json.loads((tmp_path / "miss" / "summary.json").read_text())["skipped_samples"] == 1
    assert main(_run_args(tmp_path, out, "missfail", 8, "data.bad_files=fail")) == 2
    assert "missing shard" in capsys.readouterr().err


def test_a_shard_whose_size_or_content_changed_is_read_from_its_tar(shard_set, tmp_path):
    out = _copy(shard_set, tmp_path)
    tar = out / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-1024:] = b"\0" * 1024  # same size, same samples: only the end-of-archive padding "changed"
    data[600] ^= 0xFF  # a flipped bit inside the first image's bytes
    tar.write_bytes(bytes(data))
    assert len(ShardDataset(out).skipped) == 0  # quick: size, layout and headers agree
    full = ShardDataset(out, verify="full")  # the sha256 differs: listed, the tar read as it is
    assert (str(tar), ) == tuple(w for w, r in full.skipped if "sha256" in r)
    with pytest.raises(DataError, match="its content differs from the sha256"):
        ShardDataset(out, verify="full", bad_files="fail")


# --- every bad member named under fail ------------------------------------------------------------

def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def good_jpeg(tmp_path) -> bytes:
    return next(write_shapes_folder(tmp_path / "one", n=3).rglob("*.jpg")).read_bytes()


def _members(jpeg: bytes) -> list[tuple[str, bytes]]:
    return [(f"{k:02d}.{ext}", jpeg if ext == "jpg" else b"1") for k in range(4) for ext in ("jpg", "cls")]


def _offset_of(raw: bytes, name: str) -> int:
    return raw.index(name.encode() + b"\0")  # its header starts with the name


@pytest.mark.parametrize("cut", ["inside-a-member", "inside-a-header", "between-members"])
def test_a_cut_shard_names_shard_and_member_under_fail(tmp_path, good_jpeg, cut):
    tar = tmp_path / "s.tar"
    raw = _tar(tar, _members(good_jpeg))
    at = {"inside-a-member": _offset_of(raw, "02.jpg") + 512 + len(good_jpeg) // 2,
          "inside-a-header": _offset_of(raw, "02.jpg") + 200,
          "between-members": _offset_of(raw, "02.jpg")}[cut]
    tar.write_bytes(raw[:at])
    member = {"inside-a-member": "s.tar:02.jpg", "inside-a-header": "s.tar:<member after 01.cls>",
              "between-members": "s.tar:<member after 01.cls>"}[cut]
    with pytest.raises(DataError, match=rf"bad sample .*{member.replace('.', '[.]')}: ") as e:
        ShardDataset(tar, bad_files="fail")
    assert "\n" not in str(e.value)
    ds = ShardDataset(tar)  # skip: the two whole samples are read, the cut is listed by member
    assert len(ds) == 2 and [w for w, _ in ds.skipped] == [str(tmp_path / member)]


def test_a_damaged_header_names_the_member_after_which_the_tar_is_unreadable(tmp_path, good_jpeg):
    tar = tmp_path / "s.tar"
    raw = bytearray(_tar(tar, _members(good_jpeg)))
    h = _offset_of(bytes(raw), "02.jpg")
    raw[h + 148:h + 156] = b"garbage!"  # the header's checksum: tarfile stops here, as at an end
    tar.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"s\.tar:<member after 01\.cls>: damaged or cut tar"):
        ShardDataset(tar, bad_files="fail")
    assert len(ShardDataset(tar)) == 2


# --- what a review of the change found ------------------------------------------------------------

@pytest.mark.parametrize("manifest", [
    {"shards": [{"name": "train-000000.tar", "samples": 20}]},  # another tool's: no format, no index
    {"format": "byol-shards/1", "shards": [{"name": "/elsewhere/train-000000.tar", "samples": 20,
                                            "sha256": "x", "index": {}}]},  # names written as paths
    ["not", "a", "mapping"],
], ids=["no-format", "path-names", "a-list"])
def test_a_manifest_byol_did_not_write_is_ignored_not_taken_for_damage(shard_set, tmp_path, manifest):
    out = _copy(shard_set, tmp_path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(out, bad_files="fail")  # every shard is healthy: no problem, under fail too
    assert len(ds) == 80 and ds.skipped == [] and ds.listed_samples is None
    assert "manifest.json ignored: " in ds.describe() and "indexed from the tar headers" in ds.describe()


def test_a_tar_cut_right_after_an_image_loses_that_sample_not_every_label(tmp_path, good_jpeg):
    tar = tmp_path / "s.tar"
    raw = _tar(tar, _members(good_jpeg))
    tar.write_bytes(raw[:_offset_of(raw, "02.cls")])  # 02.jpg whole, its .cls gone
    ds = ShardDataset(tar)
    assert len(ds) == 2 and ds.labels == [1, 1]  # the set keeps its labels
    assert (f"{tar}:02.jpg", "no .cls member, in a labelled shard set") in ds.skipped
    with pytest.raises(DataError, match=r"s\.tar:<member after 02\.jpg>"):
        ShardDataset(tar, bad_files="fail")


def test_a_tar_padded_to_a_large_record_size_is_intact(tmp_path, good_jpeg):
    tar = tmp_path / "s.tar"
    raw = _tar(tar, _members(good_jpeg))
    tar.write_bytes(raw + b"\0" * (3 << 20))  # what tar -b 4096 (2 MiB records) leaves: zeros
    ds = ShardDataset(tar, bad_files="fail")
    assert len(ds) == 4 and ds.skipped == []


def test_records_with_tabs_and_names_that_are_not_utf8_are_written_once(tmp_path):
    import os

    from byol.data.skips import read_skipped, unique, write_skipped

    name = os.fsdecode(b"/imgs/caf\xe9.jpg")  # a Latin-1 file name, as the file system gives it
    records = [(name, "truncated JPEG"), ("/imgs/a\tb.jpg", "line one\nline two")]
    path = tmp_path / "skipped_files.tsv"
    write_skipped(records, path)
    write_skipped(unique([*read_skipped(path), *records]), path)  # what a resume's merge does
    assert path.read_bytes() == b"/imgs/caf\xe9.jpg\ttruncated JPEG\n/imgs/a b.jpg\tline one line two\n"


def test_a_resume_merges_the_records_a_killed_session_left(tmp_path):
    data, late = _late_bad_shards(tmp_path)
    assert main(_run_args(tmp_path, data, "killed", 8, "train.max_steps=1")) == 0
    run = tmp_path / "killed"
    left = run / ".skipped" / "rank1"  # as a SIGKILL leaves them: a record and a torn line
    left.mkdir(parents=True)
    (left / "worker-999.jsonl").write_text(json.dumps(["/gone/x.jpg", "truncated JPEG"]) + '\n["/gone/y.j')
    assert main(["pretrain", "--resume", str(run), "train.max_steps=2"]) == 0
    lines = (run / "skipped_files.tsv").read_text().splitlines()
    assert "/gone/x.jpg\ttruncated JPEG" in lines and not any("/gone/y" in x for x in lines)
    assert not (run / ".skipped").exists()


def test_full_verification_under_a_limit_hashes_only_the_shards_it_reads(shard_set, monkeypatch):
    import byol.data.shards as shards_module

    hashed = []
    real = shards_module.content_reason
    monkeypatch.setattr(shards_module, "content_reason", lambda shard, entry: hashed.append(shard.name) or
                        real(shard, entry))
    ds = ShardDataset(shard_set, verify="full", limit=3, seed=1)
    read = sorted({ds.shards[s].name for s in ds.shard_of})
    assert sorted(hashed) == read and len(read) < 4
