"""The `byol` command end to end: real effects, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byol.cli import main
from byol.train.checkpoint import find_checkpoint
from conftest import TINY, add_bad_files, write_shapes_folder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet18.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "byol", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_pretrain_on_a_folder_end_to_end(tmp_path, capsys):
    """A few steps through the real command: loss drops, checkpoint loads, kNN is written."""
    data = write_shapes_folder(tmp_path / "imgs", n=60, classes=3)
    out = run_cli("pretrain", "--config", str(CONFIG), *TINY, f"data.path={data}",
                  "data.val_fraction=0.2", "optim.epochs=6", "optim.base_lr=1.0",
                  f"train.out_dir={tmp_path / 'runs'}", "train.name=e2e")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "e2e"
    assert f"run directory: {run}" in out.stdout
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]
    assert len(rows) == 36  # 48 train images / batch 8 = 6 steps x 6 epochs
    assert all(0 <= r["online_linear_top1"] <= 100 for r in rows) and not any(r["collapsed"] for r in rows)
    (final,) = [r for r in logged if "loss" not in r]  # the final held-out evaluation
    assert final["step"] == 36 and {"val_knn_top1", "val_online_linear_top1"} <= final.keys()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == summary["total_steps"] == 36
    assert summary["collapsed"] is False and summary["knn_top1"] == final["val_knn_top1"]
    assert "online linear top-1" in out.stdout
    first, last = sum(r["loss"] for r in rows[:6]) / 6, sum(r["loss"] for r in rows[-6:]) / 6
    assert last < first - 0.1, (first, last)
    sd = torch.load(find_checkpoint(run), weights_only=True)
    assert sd["step"] == 36 and "encoder.conv1.weight" in sd["model"]
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert knn["n_test"] == 12 and 0 <= knn["top1"] <= 100
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())

    # evaluate the same checkpoint on folders (transfer-style) through `byol eval knn`
    out = run_cli("eval", "knn", str(run), "--train", str(data), "--test", str(data), "--k", "3")
    assert out.returncode == 0, out.stderr
    assert "top-1" in out.stdout and (run / "eval" / f"knn_{tmp_path.name}_imgs.json").is_file()
    _expect_error(capsys, ["eval", "knn", str(run), "--k", "0"], "--k >= 1")
    _expect_error(capsys, ["eval", "knn", str(run), "--device", "gpu0"], "--device must be")
    _expect_error(capsys, ["eval", "knn", str(run), "--train", str(data)], "both --train and --test")


def _expect_error(capsys, args, *needles):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byol: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    return lines[0]


def _pretrain(tmp_path, *extra):
    return ["pretrain", "--config", str(CONFIG), *TINY, f"train.out_dir={tmp_path / 'runs'}", *extra]


def test_missing_data_path(tmp_path, capsys):
    _expect_error(capsys, _pretrain(tmp_path, f"data.path={tmp_path / 'nope'}"), "folder not found", "nope")


def test_data_path_not_given(tmp_path, capsys):
    _expect_error(capsys, _pretrain(tmp_path), "data.path")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, _pretrain(tmp_path, f"data.path={tmp_path / 'empty'}"), "no images", "empty")


def test_bad_files_are_skipped_and_listed(tmp_path, capsys):
    data = write_shapes_folder(tmp_path / "imgs", n=24, classes=2)
    bad = add_bad_files(data)
    code = main(_pretrain(tmp_path, f"data.path={data}", "train.name=skip", "train.max_steps=1",
                          "data.val_fraction=0"))
    assert code == 0
    listed = (tmp_path / "runs" / "skip" / "skipped_files.tsv").read_text()
    for path in bad:
        assert str(path) in listed
    assert "skipped: 3 record(s) of unreadable images" in capsys.readouterr().out


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_files_fail_policy_names_the_file(tmp_path, capsys, which):
    data = write_shapes_folder(tmp_path / "imgs", n=12, classes=2)
    bad = add_bad_files(data)
    for i, path in enumerate(bad):
        if i != which:
            path.unlink()
    _expect_error(capsys, _pretrain(tmp_path, f"data.path={data}", "data.bad_files=fail"), str(bad[which]))


def test_unknown_key_suggests_the_nearest(tmp_path, capsys):
    _expect_error(capsys, _pretrain(tmp_path, "optim.bach_size=8"), "optim.bach_size", "optim.batch_size")


@pytest.mark.parametrize("override,needle", [("method.tau_base=1.5", "method.tau_base"),
                                             ("optim.batch_size=0", "optim.batch_size"),
                                             ("optim.epochs=ten", "optim.epochs")])
def test_wrong_type_or_range(tmp_path, capsys, override, needle):
    _expect_error(capsys, _pretrain(tmp_path, override), needle)


def test_resume_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  epochs: 1\n")
    _expect_error(capsys, ["pretrain", "--resume", str(run)], "no checkpoint", str(run))
    _expect_error(capsys, ["pretrain", "--resume", str(tmp_path / "nope")], "nope")


def test_missing_config_file(tmp_path, capsys):
    _expect_error(capsys, ["pretrain", "--config", str(tmp_path / "x.yaml")], "x.yaml", "built-in configs")


def test_batch_larger_than_dataset(tmp_path, capsys):
    data = write_shapes_folder(tmp_path / "imgs", n=6, classes=2)
    _expect_error(capsys, _pretrain(tmp_path, f"data.path={data}", "optim.batch_size=64"), "optim.batch_size=64")


def test_error_from_the_real_process_has_no_traceback(tmp_path):
    out = run_cli(*_pretrain(tmp_path, "method.tau_base=1.5"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "method.tau_base must be in [0, 1], got 1.5" in out.stderr


@pytest.mark.parametrize("cmd", [["--help"], ["pretrain", "--help"], ["demo", "--help"], ["eval", "knn", "--help"]])
def test_help_has_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(cmd)
    assert exit_.value.code == 0
    assert "byol" in capsys.readouterr().out


def test_resume_after_max_steps_runs_to_the_end(tmp_path, capsys):
    args = _pretrain(tmp_path, "data.dataset=shapes", "data.shapes_size=40", "data.val_fraction=0",
                     "optim.epochs=1", "train.name=ms", "train.max_steps=2")
    assert main(args) == 0
    run = tmp_path / "runs" / "ms"
    assert f"continue with: byol pretrain --resume {run}" in capsys.readouterr().out
    assert main(["pretrain", "--resume", str(run)]) == 0  # the printed command, as is
    assert torch.load(find_checkpoint(run), weights_only=True)["step"] == 5


def test_resume_rejects_changes_to_what_is_trained(tmp_path, capsys):
    args = _pretrain(tmp_path, "data.dataset=shapes", "data.shapes_size=40", "data.val_fraction=0",
                     "train.name=ch", "train.max_steps=1")
    assert main(args) == 0
    _expect_error(capsys, ["pretrain", "--resume", str(tmp_path / "runs" / "ch"), "optim.batch_size=16"],
                  "optim.batch_size cannot change")


def test_same_run_name_twice_is_refused(tmp_path, capsys):
    args = _pretrain(tmp_path, "data.dataset=shapes", "data.shapes_size=40", "data.val_fraction=0",
                     "train.name=twice", "train.max_steps=1")
    assert main(args) == 0
    _expect_error(capsys, args, "already holds a run", "--resume")


def test_file_that_fails_to_decode_late(tmp_path, capsys):
    """Passes the cheap header/trailer check but cannot be decoded: named under fail."""
    data = write_shapes_folder(tmp_path / "imgs", n=12, classes=2)
    bad = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50 + b"\xff\xd9")
    _expect_error(capsys, _pretrain(tmp_path, f"data.path={data}", "data.bad_files=fail",
                                    "data.val_fraction=0"), str(bad))


@pytest.mark.parametrize("text,needle", [("- a\n- b\n", "must be a mapping of sections"),
                                         ("optim: [1, 2]\n", "section 'optim' must be a mapping")])
def test_config_file_of_the_wrong_shape(tmp_path, capsys, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _expect_error(capsys, ["pretrain", "--config", str(path)], needle)


@pytest.mark.parametrize("override,needle", [("optim.warmup_epochs=.inf", "finite"),
                                             ("model.width=.nan", "finite")])
def test_non_finite_numbers(tmp_path, capsys, override, needle):
    _expect_error(capsys, _pretrain(tmp_path, override), needle)


def test_eval_knn_bad_inputs(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    _expect_error(capsys, ["eval", "knn", str(tmp_path / "t.pt")], "not a byol checkpoint")
    (tmp_path / "empty_run").mkdir()
    _expect_error(capsys, ["eval", "knn", str(tmp_path / "empty_run")], "no checkpoint")


def test_a_folder_or_file_named_like_a_builtin_config_never_shadows_it(tmp_path, monkeypatch, capsys):
    """A bare --config name is the built-in config; a path is a file (issue: a subfolder named
    `auto` in the working directory stopped `byol pretrain data.path=...` with 'auto is a folder')."""
    from byol.config import resolve_config_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto").mkdir()  # e.g. a folder of photos named auto
    (tmp_path / "demo").write_text("not: [a config\n")  # a file named like a built-in
    builtin = Path(resolve_config_path("auto"))
    assert builtin.name == "auto.yaml" and builtin.parent.name == "configs" and builtin.is_file()
    assert Path(resolve_config_path("demo")).parent.name == "configs"
    # written as a path, the local one is taken
    assert resolve_config_path("./demo") == Path("./demo")
    (tmp_path / "mine.yaml").write_text("optim: {epochs: 1}\n")
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")
    # the default (auto) reaches the data check, not the folder named auto
    _expect_error(capsys, ["pretrain", f"data.path={tmp_path / 'nope'}"], "nope")
    # a config given as a path that is a folder is still named in one line
    _expect_error(capsys, ["pretrain", "--config", "./auto", "data.dataset=shapes"], "auto is a folder")
