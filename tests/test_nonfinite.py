"""The non-finite guard: a diverging run stops before it writes a bad checkpoint; skip drops bad steps."""
from __future__ import annotations

import json
import math

import pytest
import torch

from byol.cli import main
from byol.config import load_config
from byol.data import pipeline
from byol.data.pipeline import DeviceViews
from byol.train import loop
from byol.train.checkpoint import load_checkpoint
from byol.train.guard import MAX_CONSECUTIVE_SKIPS, TrainingDiverged
from byol.train.pretrain import pretrain
from conftest import TINY

# No normalisation anywhere and plain SGD at a huge rate: the loss is NaN by the third step.
EXPLODES = ["model.backbone_norm=none", "model.head_norm=none", "model.predictor_norm=none",
            "optim.name=sgd", "optim.base_lr=1e4", "train.precision=fp32"]


def _cfg(tmp_path, name, *extra):
    # 48 images, batch 8: 6 steps per epoch, 4 epochs = 24 steps
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0",
                              "optim.epochs=4", f"train.out_dir={tmp_path}", f"train.name={name}",
                              "train.checkpoint_every=2", "eval.final_knn=false", *extra])


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(sd) -> bool:
    return all(torch.isfinite(v).all() for v in sd["model"].values() if v.is_floating_point())


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        pretrain(_cfg(tmp_path, "run", *EXPLODES))
    result = info.value.result
    d = result.diverged
    assert d["what"] == "loss" and d["last_good_step"] is not None and d["step"] > d["last_good_step"]
    msg = str(info.value)
    assert "\n" not in msg
    assert f"non-finite loss at step {d['step']}" in msg and f"last good one is step {d['last_good_step']}" in msg
    assert "optim.base_lr" in msg and f"--resume {result.run_dir}" in msg
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert last["step"] == d["last_good_step"] and _all_finite(last)  # never overwritten by NaN weights
    rows = _rows(result.run_dir)
    assert not math.isfinite(next(r["loss"] for r in rows if r["step"] == d["step"]))
    assert rows[-1]["event"] == "diverged" and rows[-1]["step"] == d["step"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["diverged"] and summary["diverged_at_step"] == d["step"] and not summary["finished"]
    assert summary["last_good_checkpoint_step"] == d["last_good_step"]


def test_cli_exits_3_with_one_line_then_resumes_with_a_lower_lr(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    config = tmp_path / "base.yaml"
    config.write_text("train: {}\n")
    monkeypatch.setattr(pipeline, "DeviceViews", _NaNViewsAt)
    monkeypatch.setattr(_NaNViewsAt, "bad_steps", {6})  # a NaN batch at step 7
    args = ["pretrain", "--config", str(config), *TINY, "data.dataset=shapes", "data.shapes_size=48",
            "data.val_fraction=0", "optim.epochs=4", "train.checkpoint_every=2", "eval.final_knn=false",
            f"train.out_dir={tmp_path}", "train.name=run"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("byol: error: training diverged: non-finite loss at step 7; ")
    assert "the last good one is step 6" in err and "optim.base_lr=0.25" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6
    # the remedy the message gives: resume from the last good checkpoint with a lower peak lr
    monkeypatch.setattr(_NaNViewsAt, "bad_steps", set())
    assert main(["pretrain", "--resume", str(run), "optim.base_lr=0.25"]) == 0
    assert "peak lr 0.0078125" in capsys.readouterr().out  # 0.25 * 8 / 256
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == 24 and _all_finite(final)
    assert "base_lr: 0.25" in (run / "config.yaml").read_text()
    assert [r["step"] for r in _rows(run) if "loss" in r] == list(range(1, 25))


def test_non_finite_weights_are_caught_before_the_checkpoint(tmp_path, monkeypatch):
    real_step = loop.train_step

    def step_then_poison(model, optimizer, *args, **kwargs):  # a finite loss, then an inf weight
        out = real_step(model, optimizer, *args, **kwargs)
        if step_then_poison.calls == 3:  # the fourth step, a checkpoint step
            with torch.no_grad():
                next(model.parameters())[0].fill_(float("inf"))
        step_then_poison.calls += 1
        return out

    step_then_poison.calls = 0
    monkeypatch.setattr(loop, "train_step", step_then_poison)
    with pytest.raises(TrainingDiverged, match="non-finite weights at step 4; .*last good one is step 2") as info:
        pretrain(_cfg(tmp_path, "run", "train.log_every=100"))
    last = load_checkpoint(info.value.result.run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 2 and _all_finite(last)


class _NaNViewsAt(DeviceViews):
    """The batched augmentation, but the first view is all NaN at the given (0-based) steps."""

    bad_steps: set[int] = set()

    def __call__(self, v1, v2, step, rank):
        v1, v2 = super().__call__(v1, v2, step, rank)
        return (v1 * float("nan"), v2) if step in self.bad_steps else (v1, v2)


def test_skip_drops_a_bad_step_without_changing_anything(tmp_path, monkeypatch):
    clean = pretrain(_cfg(tmp_path, "clean", "train.max_steps=4"))
    monkeypatch.setattr(pipeline, "DeviceViews", _NaNViewsAt)
    monkeypatch.setattr(_NaNViewsAt, "bad_steps", {4})  # the fifth step sees NaN images
    skipped = pretrain(_cfg(tmp_path, "skip", "train.nonfinite=skip", "train.max_steps=5"))
    sd_a = load_checkpoint(clean.run_dir / "checkpoints" / "last.pt")
    sd_b = load_checkpoint(skipped.run_dir / "checkpoints" / "last.pt")
    a, b = sd_a["model"], sd_b["model"]
    for key in a:  # weights, target and batch-norm statistics exactly as before the bad step
        assert torch.equal(a[key], b[key]), key
    for s_a, s_b in zip(sd_a["optimizer"]["state"].values(), sd_b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])  # no optimizer step
    for k, v in sd_a["probe"]["module"].items():  # the online classifier did not see the batch
        assert torch.equal(v, sd_b["probe"]["module"][k]), k
    rows = {r["step"]: r for r in _rows(skipped.run_dir)}
    assert rows[5]["skipped"] == 1.0 and all(rows[s]["skipped"] == 0.0 for s in range(1, 5))
    # the stop policy on the same data stops instead
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 5"):
        pretrain(_cfg(tmp_path, "stop", "train.max_steps=5"))


def test_skip_gives_up_after_too_many_bad_steps_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DeviceViews", _NaNViewsAt)
    monkeypatch.setattr(_NaNViewsAt, "bad_steps", set(range(2, 100)))
    with pytest.raises(TrainingDiverged, match=f"{MAX_CONSECUTIVE_SKIPS} consecutive steps with non-finite "
                                               "gradients at step 22") as info:
        pretrain(_cfg(tmp_path, "run", "train.nonfinite=skip"))
    assert _all_finite(load_checkpoint(info.value.result.run_dir / "checkpoints" / "last.pt"))
