"""`byol neighbors` and `byol map` through the CLI, on a tiny run and its export: the PNG has
the grid's shape, the JSON holds k sorted neighbours per query (never the query itself), the
same seed gives the same result, the map has one labelled point per image, and mistakes are one
line with exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from byol.cli import main
from byol.config import load_config
from byol.eval.pictures import CELL, nearest, pca_2d
from byol.export import export_encoder
from byol.train.pretrain import pretrain
from conftest import TINY, write_shapes_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step tiny pretraining run (ResNet-18 1/8 width, CIFAR stem, 16 px)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=16", "data.val_fraction=0",
                             "train.max_steps=2", f"train.out_dir={out}", "train.name=r"])
    return pretrain(cfg).run_dir


@pytest.fixture(scope="module")
def encoder(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "enc.safetensors"
    export_encoder(run_dir, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("imgs") / "images", n=24, classes=3, size=16)


def _expect_error(capsys, args, *needles):
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("byol: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_neighbors_grid_json_and_determinism(encoder, folder, tmp_path, capsys):
    out = tmp_path / "nn.png"
    args = ["neighbors", str(encoder), str(folder), "--n-queries", "3", "--k", "4", "--seed", "1", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    assert "3 queries x 4 neighbours among 24 images" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (5 * CELL, 3 * CELL)  # cols = k + 1, rows = queries
    first = json.loads(out.with_suffix(".json").read_text())
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")}
    assert len(first["queries"]) == 3 and len({q["file"] for q in first["queries"]}) == 3
    for q in first["queries"]:
        sims = [nb["similarity"] for nb in q["neighbours"]]
        names = [nb["file"] for nb in q["neighbours"]]
        assert len(names) == 4 and len(set(names)) == 4 and q["file"] not in names
        assert sims == sorted(sims, reverse=True) and all(-1 - 1e-6 <= s <= 1 + 1e-6 for s in sims)
        assert q["file"] in files and set(names) <= files
        assert q["label"] == q["file"].split("/")[0]  # labels come from the class subfolders
    # the second run reads the features from the cache and gives the same queries and neighbours
    again = tmp_path / "again.png"
    assert main([*args, "--out", str(again)]) == 0
    assert "from the cache" in capsys.readouterr().out
    assert json.loads(again.with_suffix(".json").read_text()) == first
    # another seed, other queries
    assert main([*args[:-3], "--seed", "2", "--no-progress", "--out", str(tmp_path / "s2.png")]) == 0
    assert [q["file"] for q in json.loads((tmp_path / "s2.json").read_text())["queries"]] != \
        [q["file"] for q in first["queries"]]


def test_neighbors_of_given_queries_with_a_run_dir(run_dir, encoder, folder, tmp_path):
    inside = sorted(folder.rglob("*.jpg"))[0]
    outside = tmp_path / "q.jpg"
    Image.open(sorted(folder.rglob("*.jpg"))[-1]).save(outside)  # a copy outside the folder
    out = tmp_path / "given.png"
    assert main(["neighbors", str(run_dir), str(folder), "--queries", str(inside), str(outside),
                 "--k", "3", "--no-progress", "--out", str(out)]) == 0
    got = json.loads(out.with_suffix(".json").read_text())["queries"]
    assert [q["file"] for q in got] == [inside.relative_to(folder).as_posix(), str(outside)]
    assert inside.relative_to(folder).as_posix() not in [nb["file"] for nb in got[0]["neighbours"]]
    # the copy of the last image finds that image first, at similarity ~1 (JPEG re-encoding aside)
    assert got[1]["neighbours"][0]["file"] == sorted(folder.rglob("*.jpg"))[-1].relative_to(folder).as_posix()
    with Image.open(out) as png:
        assert png.size == (4 * CELL, 2 * CELL)


def test_map_has_one_labelled_point_per_image(encoder, folder, tmp_path, capsys):
    out = tmp_path / "map.png"
    assert main(["map", str(encoder), str(folder), "--thumbnails", "--no-progress", "--out", str(out)]) == 0
    assert "map of 24 images (pca, 3 classes)" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and min(png.size) > 100
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["method"] == "pca" and got["classes"] == sorted(p.name for p in folder.iterdir())
    points = got["points"]
    assert len(points) == 24 and len({p["file"] for p in points}) == 24
    assert all(p["label"] == p["file"].split("/")[0] for p in points)
    xy = np.array([[p["x"], p["y"]] for p in points])
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0


def test_nearest_and_pca_on_known_vectors():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    sims, idx = nearest(feats, feats[:1], k=2, exclude=torch.tensor([0]))
    assert idx.tolist() == [[1, 2]] and sims[0, 0] > 0.99 and abs(sims[0, 1] - 0.0) < 1e-6
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    xy = pca_2d(x)
    assert xy.shape == (50, 2) and np.allclose(xy.mean(axis=0), 0, atol=1e-9)
    assert xy[:, 0].var() >= xy[:, 1].var() and np.array_equal(xy, pca_2d(x))


def test_mistakes_are_one_line(encoder, folder, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    _expect_error(capsys, ["neighbors", str(encoder), str(tmp_path / "missing"), "--out", out], "missing")
    _expect_error(capsys, ["map", str(encoder), str(tmp_path / "missing"), "--out", out], "missing")
    _expect_error(capsys, ["neighbors", str(tmp_path / "nope.safetensors"), str(folder), "--out", out], "nope")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _expect_error(capsys, ["map", str(bad), str(folder), "--out", out], "bad.safetensors")
    _expect_error(capsys, ["neighbors", str(encoder), str(folder), "--k", "24", "--no-progress", "--out", out],
                  "--k 24", "23")
    _expect_error(capsys, ["neighbors", str(encoder), str(folder), "--n-queries", "25", "--no-progress",
                           "--out", out], "--n-queries 25")
    _expect_error(capsys, ["neighbors", str(encoder), str(folder), "--queries", str(tmp_path / "q0.jpg"),
                           "--out", out], "q0.jpg")
    _expect_error(capsys, ["map", str(encoder), str(folder), "--out", str(tmp_path / "x.jpg")], "x.jpg")


@pytest.mark.parametrize("cmd", ["neighbors", "map"])
def test_help_has_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0 and "example:" in capsys.readouterr().out


def test_map_of_an_unlabelled_folder_without_the_cache(run_dir, folder, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(folder.rglob("*.jpg"))[:10]:
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "flat_map.png"
    cache = run_dir / "eval" / "feature_cache"
    before = sorted(cache.glob("*")) if cache.is_dir() else []
    assert main(["map", str(run_dir), str(flat), "--no-cache", "--no-progress", "--out", str(out)]) == 0
    assert "map of 10 images (pca)" in capsys.readouterr().out
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["classes"] == [] and len(got["points"]) == 10 and all(p["label"] is None for p in got["points"])
    assert (sorted(cache.glob("*")) if cache.is_dir() else []) == before  # --no-cache wrote nothing
    assert main(["map", str(run_dir), str(flat), "--no-progress", "--out", str(out)]) == 0
    assert len(list(cache.glob("*.safetensors"))) == len(before) + 1  # ... and without it, one file


def test_neighbors_of_queries_in_a_folder_of_symlinked_images(encoder, folder, tmp_path):
    # a folder of links to the images (as one makes to pick a subset of a dataset), queries given
    # inside it: each query is one of the folder's rows, never its own neighbour
    links = tmp_path / "links"
    for image in sorted(folder.rglob("*.jpg")):
        (links / image.parent.name).mkdir(parents=True, exist_ok=True)
        (links / image.parent.name / image.name).symlink_to(image)
    queries = sorted(links.rglob("*.jpg"))[:2]
    out = tmp_path / "linked.png"
    assert main(["neighbors", str(encoder), str(links), "--queries", *map(str, queries),
                 "--k", "3", "--no-progress", "--out", str(out)]) == 0
    got = json.loads(out.with_suffix(".json").read_text())["queries"]
    assert [q["file"] for q in got] == [q.relative_to(links).as_posix() for q in queries]
    for q in got:
        assert q["file"] not in [nb["file"] for nb in q["neighbours"]]
