"""`byol eval linear|finetune`, `byol export`, `byol embed`, `byol report` through the CLI, on one
tiny pretraining run: each writes what it says, and user mistakes are one line with exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

import byol
from byol.cli import main
from conftest import TINY, write_shapes_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run on the built-in shapes (64 images, 16 held out)."""
    out = tmp_path_factory.mktemp("runs")
    code = main(["pretrain", "--config", "demo", *TINY, "data.shapes_size=64", "data.val_fraction=0.25",
                 "optim.epochs=2", "train.budget=null", "augment.eval_size=null", "eval.initial_knn=false",
                 "eval.knn_every=1",
                 f"train.out_dir={out}", "train.name=tiny"])
    assert code == 0
    return out / "tiny"


def _expect_error(capsys, args, *needles):
    capsys.readouterr()  # drop what earlier commands printed
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("byol: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _result(run, name):
    return json.loads((run / "eval" / name).read_text())


def test_eval_linear_fast_and_paper_and_random_floor(run, capsys):
    assert main(["eval", "linear", str(run), "--epochs", "20", "--lrs", "0.1,1", "--weight-decays", "0"]) == 0
    fast = _result(run, "linear_fast_heldout.json")
    assert 0 <= fast["top1"] <= 100 and fast["n_test"] == 16
    assert "linear (fast" in capsys.readouterr().out
    assert main(["eval", "linear", str(run), "--epochs", "20", "--lrs", "0.1,1", "--weight-decays", "0",
                 "--random-init"]) == 0
    assert (run / "eval" / "linear_fast_heldout_random_init.json").is_file()
    assert main(["eval", "linear", str(run), "--protocol", "paper", "--epochs", "1", "--batch-size", "16"]) == 0
    paper = _result(run, "linear_paper_heldout.json")
    assert paper["epochs"] == 1 and paper["n_test"] == 16 and paper["lr"] == pytest.approx(0.2 * 16 / 256)
    _expect_error(capsys, ["eval", "linear", str(run), "--protocol", "paper", "--epochs", "0"], "--epochs")
    _expect_error(capsys, ["eval", "linear", str(run), "--protocol", "paper", "--lrs", "0.1"], "--lrs")
    _expect_error(capsys, ["eval", "linear", str(run), "--base-lr", "0.1"], "--base-lr")


def test_eval_knn_random_floor_and_a_changed_data_folder(run, tmp_path, capsys):
    assert main(["eval", "knn", str(run), "--random-init"]) == 0
    floor = _result(run, "knn_heldout_random_init.json")
    assert floor["random_init"] and floor["n_test"] == 16
    assert "random-init" in capsys.readouterr().out
    # the run's held-out split is rebuilt from its data: if that data changed, refuse
    import shutil

    data = write_shapes_folder(tmp_path / "imgs", n=24, classes=3)
    out = tmp_path / "runs"
    assert main(["pretrain", "--config", "demo", *TINY, f"data.path={data}", "data.dataset=folder",
                 "data.val_fraction=0.25", "optim.epochs=1", "train.budget=null", "augment.eval_size=null",
                 f"train.out_dir={out}", "train.name=f"]) == 0
    shutil.copy(next((data / "circle").glob("*.jpg")), data / "circle" / "extra.jpg")
    _expect_error(capsys, ["eval", "knn", str(out / "f")], "the data changed")


def test_eval_finetune_saves_its_label_subset(run, capsys):
    assert main(["eval", "finetune", str(run), "--labels-fraction", "0.25", "--epochs", "1",
                 "--batch-size", "8"]) == 0
    out = _result(run, "finetune_25pct_heldout.json")
    subset = (run / "eval" / "labels_25pct_seed0_heldout.txt").read_text().splitlines()
    assert out["n_labelled"] == len(subset) == 16  # 48 train images: 8 classes x 6 -> round(1.5) = 2 each
    assert "labelled subset:" in capsys.readouterr().out
    _expect_error(capsys, ["eval", "finetune", str(run), "--labels-fraction", "2"], "--labels-fraction")
    _expect_error(capsys, ["eval", "finetune", str(run), "--labels-file", str(run / "nope.txt")], "nope.txt")


def test_export_load_embed(run, tmp_path, capsys):
    enc = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(enc)]) == 0
    assert enc.is_file() and (tmp_path / "enc.json").is_file()
    _expect_error(capsys, ["export", str(run), "--out", str(enc)], str(enc))  # no silent overwrite
    encoder = byol.load_encoder(enc)
    images = write_shapes_folder(tmp_path / "imgs", n=12, classes=3)
    assert main(["embed", str(enc), str(images), "--out", str(tmp_path / "emb.npy"), "--no-progress"]) == 0
    emb = np.load(tmp_path / "emb.npy")
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert emb.shape == (12, encoder.feature_dim) and len(files) == 12 and np.isfinite(emb).all()
    _expect_error(capsys, ["embed", str(enc), str(tmp_path / "missing"), "--out", str(tmp_path / "x.npy")],
                  "missing")


def test_report_writes_plots_and_summary(run, tmp_path, capsys):
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    summary = (run / "report" / "summary.md").read_text()
    assert "summary.md" in printed and "knn" in summary.lower()
    assert {p.name for p in (run / "report").glob("*.png")} >= {"loss.png", "accuracy.png", "collapse.png"}
    _expect_error(capsys, ["report", str(tmp_path / "not_a_run")], "not_a_run")


@pytest.mark.parametrize("cmd", [["eval", "linear"], ["eval", "finetune"], ["export"], ["embed"], ["report"]])
def test_help_has_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*cmd, "--help"])
    assert exit_.value.code == 0 and "example:" in capsys.readouterr().out
