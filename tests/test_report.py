"""`byol report`: plots and summary.md from a run directory (synthetic runs and one real tiny run)."""
from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pytest
import yaml
from PIL import Image

from byol.config import config_to_dict, load_config
from byol.data.errors import DataError
from byol.report import make_report
from byol.report.plots import DPI, FIGSIZE, smooth
from byol.train.pretrain import pretrain
from byol.train.rundir import read_metrics
from conftest import TINY

PNG_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # 840 x 420
EVALS = {  # name -> (top1, top5)
    "knn": (61.25, 95.5), "knn_init": (23.75, 70.0), "linear_fast_shapes": (72.5, 98.25),
    "finetune_10pct_shapes": (55.5, 90.75), "linear_paper_shapes_random_init": (31.5, 80.0),
}


def write_synthetic_run(run_dir, *, epochs=20, steps_per_epoch=50, collapse_step=700):
    """A run with every key the trainer logs: training rows every 5 steps, effective ranks every
    50, held-out monitor rows every 2 epochs, a collapse at ``collapse_step``, all eval files."""
    rng = np.random.default_rng(0)
    run_dir.mkdir(parents=True)
    cfg = config_to_dict(load_config(None, [f"optim.epochs={epochs}", "optim.batch_size=64",
                                            "train.log_every=5", "eval.collapse_threshold=0.1"]))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    total, t0, rows = epochs * steps_per_epoch, 1.8e9, []
    for step in range(5, total + 1, 5):
        collapsed = step >= collapse_step
        z_std = 0.02 if collapsed else 0.9 - 0.2 * step / total
        loss = 0.01 if collapsed else 3.9 * math.exp(-step / 200) + 0.3 + 0.05 * rng.standard_normal()
        row = {"step": step, "time": t0 + step * 0.1, "loss": loss, "z_std": z_std,
               "lr": 0.4 * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / total)),
               "tau": 1 - 0.004 * 0.5 * (1 + math.cos(math.pi * step / total)),
               "epoch": (step - 1) // steps_per_epoch, "images_per_s": 640.0 + rng.normal(0, 20),
               "online_linear_top1": 10 + 40 * step / total + rng.normal(0, 3), "collapsed": int(collapsed)}
        if step % 50 == 0:
            row.update(z_rank=1.0 if collapsed else 40 - 10 * step / total, y_rank=60 - 20 * step / total)
        rows.append(row)
        if step % (2 * steps_per_epoch) == 0 and step < total:
            acc = 20 + 50 * step / total if not collapsed else 15.0
            rows.append({"step": step, "time": row["time"] + 1, "epoch": step // steps_per_epoch,
                         "val_knn_top1": acc, "val_knn_top5": acc + 20,
                         "val_online_linear_top1": acc - 5, "val_online_linear_top5": acc + 15})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, (top1, top5) in EVALS.items():
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / f"{name}.json").write_text(json.dumps({"top1": top1, "top5": top5, "k": 20}))
    (run_dir / "eval" / "features.json").write_text(json.dumps({"dim": 512}))  # no top1: not a result
    (run_dir / "eval" / "torn.json").write_text('{"top1": 5')
    (run_dir / "skipped_files.tsv").write_text("a.jpg\tempty file\nb.jpg\ttruncated\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "step": total, "total_steps": total, "finished": True, "elapsed_s": 3725.0, "images_per_s": 612.5,
        "collapsed": True, "collapsed_at_step": collapse_step, "device": "cuda", "precision": "bf16"}))
    return rows


def _png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_full_run_report(tmp_path):
    rows = write_synthetic_run(tmp_path / "run")
    rc_before = dict(matplotlib.rcParams)
    out = make_report(tmp_path / "run")
    assert dict(matplotlib.rcParams) == rc_before  # styles are scoped to the report
    assert out["dir"] == tmp_path / "run" / "report" and out["skipped"] == {}
    assert [p.name for p in out["plots"]] == ["loss.png", "schedules.png", "collapse.png", "accuracy.png"]
    for path in out["plots"]:
        assert _png_size(path) == PNG_SIZE
    text = out["summary"].read_text()
    assert out["summary"] == tmp_path / "run" / "report" / "summary.md"
    last = [r for r in rows if "loss" in r][-1]
    assert f"| loss | {last['loss']:.4g} |" in text
    assert "| collapsed | **yes** at step 700 (z_std < 0.1) |" in text
    assert "| steps | 1000 / 1000 (100%) |" in text and "| finished | yes |" in text
    assert "1 h 02 min (summary.json)" in text and "612.5 (overall)" in text and "cuda (bf16)" in text
    assert "| skipped files | 2 (skipped_files.tsv) |" in text
    for name, (top1, top5) in EVALS.items():
        assert f"| `{name}` | {top1:.2f} | {top5:.2f} | k=20 |" in text
    assert "features" not in text and "eval/torn.json could not be read" in text
    for png in ("loss.png", "schedules.png", "collapse.png", "accuracy.png"):
        assert f"![{png[:-4]}]({png})" in text  # relative links: the folder can be moved
    assert "Not plotted" not in text
    assert "| `optim` | name=lars batch_size=64 epochs=20 " in text


def test_missing_keys_and_files_are_skipped_and_said(tmp_path):
    """An old or partial run: only loss (one nan) and images/s, a row without loss, no config,
    no summary.json, no eval: loss.png alone, the rest named as not plotted, time from the log."""
    run = tmp_path / "old"
    run.mkdir()
    rows = [{"step": 10, "time": 100.0, "loss": 4.0, "images_per_s": 100.0},
            {"step": 20, "time": 160.0, "loss": float("nan"), "images_per_s": 300.0},
            {"step": 25, "time": 190.0, "epoch": 0},
            {"step": 30, "time": 220.0, "loss": 2.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')
    out = make_report(run, tmp_path / "elsewhere")
    assert [p.name for p in out["plots"]] == ["loss.png"] and _png_size(out["plots"][0]) == PNG_SIZE
    assert set(out["skipped"]) == {"schedules.png", "collapse.png", "accuracy.png"}
    text = (tmp_path / "elsewhere" / "summary.md").read_text()
    assert "- Not plotted: schedules.png: no lr or tau values in metrics.jsonl." in text
    assert "- Not plotted: accuracy.png: no kNN or online-linear accuracy in metrics.jsonl." in text
    assert "| loss | 2.5 |" in text and "| collapsed | unknown (not logged) |" in text
    assert "| steps | 30 (total unknown) |" in text and "unknown (no current summary.json" in text
    assert "| wall time | 2 min 00 s (metrics.jsonl timestamps) |" in text
    assert "| images/s | 200.0 (mean of logged rows) |" in text
    assert "No evaluation results" in text and "Not available: config: file not found" in text


def test_totals_and_collapse_from_the_log_without_summary_json(tmp_path):
    rows = write_synthetic_run(tmp_path / "run", epochs=4, steps_per_epoch=50, collapse_step=150)
    (tmp_path / "run" / "summary.json").unlink()
    text = make_report(tmp_path / "run")["summary"].read_text()
    assert "| steps | 200 / 200 (100%) |" in text  # 50 steps/epoch from the monitor row at epoch 2
    assert "| collapsed | **yes** at step 150 (z_std < 0.1) |" in text
    mean = np.mean([r["images_per_s"] for r in rows if "images_per_s" in r])
    assert f"| images/s | {mean:.1f} (mean of logged rows) |" in text


def test_summary_json_older_than_the_log_is_ignored(tmp_path):
    """A resumed run still training: its summary.json is from the earlier stop (step 40)."""
    write_synthetic_run(tmp_path / "run", epochs=2)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({
        "step": 40, "total_steps": 100, "finished": False, "elapsed_s": 9.0, "device": "cuda"}))
    text = make_report(tmp_path / "run")["summary"].read_text()
    assert "| steps | 100 (total unknown) |" in text and "no current summary.json" in text
    assert "cuda" not in text and "stopped early" not in text


@pytest.mark.parametrize("make, needle", [
    (lambda p: p, "run directory not found"),
    (lambda p: (p.write_text("x"), p)[1], "is a file, not a run directory"),
    (lambda p: (p.mkdir(), p)[1], "has no metrics.jsonl"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text(""), p)[2], "has no logged steps"),
])
def test_not_a_run_directory(tmp_path, make, needle):
    path = make(tmp_path / "r")
    with pytest.raises(DataError) as info:
        make_report(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_output_folder_is_a_file(tmp_path):
    write_synthetic_run(tmp_path / "run", epochs=2)
    (tmp_path / "out").write_text("")
    with pytest.raises(DataError, match="output folder .*out is a file"):
        make_report(tmp_path / "run", tmp_path / "out")


def test_smooth_is_a_centred_moving_average():
    assert smooth([1.0] * 20) is None  # too few logs to smooth
    values = np.arange(80, dtype=float)  # a line: a centred average leaves it alone inside
    out = smooth(values)
    assert np.allclose(out[2:-2], values[2:-2])
    assert out[0] == pytest.approx(np.mean(values[:3]))  # window of 5, cut to 3 at the edge
    assert np.allclose(smooth([2.0] * 80), 2.0)


def test_real_run_stopped_by_max_steps(tmp_path):
    """A real tiny pretraining stopped by train.max_steps (finished=false) on labelled shapes."""
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48",
                             "data.shapes_image_size=16", "data.val_fraction=0.25",
                             "train.max_steps=3", f"train.out_dir={tmp_path}", "train.name=r",
                             "train.precision=fp32"])
    result = pretrain(cfg)
    assert not result.finished
    out = make_report(result.run_dir)
    assert {p.name for p in out["plots"]} == {"loss.png", "schedules.png", "collapse.png", "accuracy.png"}
    assert all(_png_size(p) == PNG_SIZE for p in out["plots"])
    text = out["summary"].read_text()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert f"| steps | 3 / {summary['total_steps']} " in text
    assert f"| finished | no: stopped early; continue with `byol pretrain --resume {result.run_dir}` |" in text
    loss = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert len(loss) == 3 and f"| loss | {loss[-1]:.4g} |" in text and "| collapsed | no |" in text
    assert "| device | cpu (fp32) |" in text
