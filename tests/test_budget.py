"""train.budget: parse the duration, measure the step rate, fix the total steps, resume it exactly."""
from __future__ import annotations

import json

import pytest
import torch

import byol.train.loop as loop
from byol.cli import main
from byol.config import ConfigError, load_config
from byol.train.budget import MEASURE_STEPS, WARMUP_STEPS, BudgetMeter, parse_budget
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.loop import Plan
from byol.train.pretrain import pretrain
from conftest import TINY

# 48 images, batch 8 -> 6 steps per epoch; warm-up 1 epoch = 6 steps
DATA = ["data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0"]
STEP_S = 0.5  # what each step "takes" on the fake clock
FIX = WARMUP_STEPS + MEASURE_STEPS  # 13: the step the total is fixed at (from step 0)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, *DATA, f"train.out_dir={tmp_path}", f"train.name={name}",
                              "train.checkpoint_every=100", "eval.final_knn=false", *extra])


@pytest.fixture
def fake_clock(monkeypatch):
    """The loop's clock advances STEP_S in each training step and never otherwise."""
    t = [1000.0]
    step = loop.train_step

    def timed_step(*args, **kwargs):
        t[0] += STEP_S
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "now", lambda: t[0])
    monkeypatch.setattr(loop, "train_step", timed_step)
    return t


def _ckpt(run_dir):
    return load_checkpoint(find_checkpoint(run_dir))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5m", 90), ("1m30s", 90)])
def test_budget_strings_parse_to_seconds(text, seconds):
    assert parse_budget(text) == seconds
    assert load_config(None, [f"train.budget={text}"]).train.budget == text
    assert load_config(None, []).train.budget is None  # off by default


@pytest.mark.parametrize("bad", ["10 minutes", "-5m", "0s", "600", "m", "5x"])
def test_bad_budgets_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.budget={bad}"])
    msg = str(e.value)
    assert "train.budget" in msg and repr(bad) in msg and "\n" not in msg


def test_total_is_the_budget_left_at_the_measured_rate():
    meter = BudgetMeter(100.0, start_step=0)
    times = {s: s * STEP_S for s in range(1, 40)}
    fixed = [meter.after_step(s, times[s]) for s in range(1, 40)]
    assert all(f is None for f in fixed[:FIX - 1])
    f = fixed[FIX - 1]
    # 2 steps/s; 100 s - 6.5 s spent at step 13 buys 187 more steps: 200, the budget at that rate
    assert (f.step, f.rate, f.elapsed_s, f.total) == (FIX, 2.0, 6.5, 200)
    # a resumed session measures from its own start; the time of earlier sessions counts
    later = BudgetMeter(100.0, start_step=50)
    assert later.after_step(50 + WARMUP_STEPS, 30.0) is None
    assert later.after_step(50 + FIX, 35.0).total == 50 + FIX + 130
    # a budget already spent ends the run at the fixing step
    spent = BudgetMeter(1.0, start_step=0)
    spent.after_step(WARMUP_STEPS, 5.0)
    assert spent.after_step(FIX, 10.0).total == FIX


def test_schedules_before_the_total_do_not_depend_on_it_and_end_at_it(tmp_path):
    cfg = _cfg(tmp_path, "plan", "train.budget=10s")
    plan = Plan(cfg, 48)
    assert plan.total is None and plan.warmup == 6
    before = [(plan.lr(s), plan.tau(s)) for s in range(FIX)]
    assert before[3] == (plan.peak * 3 / 6, cfg.method.tau_base) and before[9] == (plan.peak, cfg.method.tau_base)
    plan.fix(20)
    assert [plan.lr(s) for s in range(6)] == [lr for lr, _ in before[:6]]  # the warm-up is the same ramp
    assert plan.lr(20) == 0.0 and plan.tau(20) == 1.0 and plan.stop_at == 20
    assert plan.lr(19) > 0 and plan.tau(19) < 1.0


def test_budget_run_fixes_its_total_from_the_rate_and_saves_it(tmp_path, fake_clock, capsys):
    # 10 s at 0.5 s/step: 6.5 s spent at step 13 leaves 3.5 s = 7 steps -> 20 steps (3.33 epochs)
    result = pretrain(_cfg(tmp_path, "run", "train.budget=10s"))
    out = capsys.readouterr().out
    assert result.finished and result.step == 20
    assert "time budget 10s" in out and "optim.epochs ignored" in out
    assert "2 steps/s over 10 steps" in out and "20 steps in all" in out and "outside it" in out
    sd = _ckpt(result.run_dir)
    assert sd["extra"]["planned_steps"] == 20 and sd["step"] == 20
    rows = _rows(result.run_dir)
    (event,) = [r for r in rows if r.get("event") == "budget"]
    assert (event["step"], event["total_steps"], event["steps_per_s"]) == (FIX, 20, 2.0)
    plan = Plan(_cfg(tmp_path, "x", "train.budget=10s"), 48)
    steps = {r["step"]: r for r in rows if "lr" in r}
    for k in range(1, FIX + 1):  # row k logs the lr/tau of step k - 1: the measuring rule
        assert steps[k]["lr"] == pytest.approx(plan.lr(k - 1)) and steps[k]["tau"] == plan.tau_base
    plan.fix(20)
    for k in range(FIX + 1, 21):
        assert steps[k]["lr"] == pytest.approx(plan.lr(k - 1)) and steps[k]["tau"] == pytest.approx(plan.tau(k - 1))


def test_resume_keeps_the_total_and_is_bitwise(tmp_path, fake_clock):
    full = pretrain(_cfg(tmp_path, "full", "train.budget=10s"))
    part = pretrain(_cfg(tmp_path, "split", "train.budget=10s", "train.max_steps=16"))  # fixed at 13
    assert not part.finished and part.step == 16
    assert _ckpt(part.run_dir)["extra"]["planned_steps"] == 20
    fake_clock[0] += 1e6  # a long pause between the sessions is not training time
    rest = pretrain(_cfg(tmp_path, "split", "train.budget=10s"), resume=part.run_dir)
    assert rest.finished and rest.step == 20
    a, b = _ckpt(full.run_dir), _ckpt(rest.run_dir)
    assert b["extra"]["planned_steps"] == 20
    assert not [r for r in _rows(rest.run_dir) if r.get("event") == "budget" and r["step"] > 16]  # not measured again
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_run_stopped_while_measuring_measures_again_on_resume(tmp_path, fake_clock):
    part = pretrain(_cfg(tmp_path, "early", "train.budget=10s", "train.max_steps=5"))
    assert part.step == 5 and not part.finished
    assert "planned_steps" not in _ckpt(part.run_dir)["extra"]
    rest = pretrain(_cfg(tmp_path, "early", "train.budget=10s"), resume=part.run_dir)
    # a new window 8..18; 9 s spent in all at step 18 leaves 1 s = 2 steps -> 20
    (event,) = [r for r in _rows(rest.run_dir) if r.get("event") == "budget"]
    assert event["step"] == 5 + FIX and event["total_steps"] == 20
    assert rest.finished and rest.step == 20 and _ckpt(rest.run_dir)["extra"]["planned_steps"] == 20


def test_byol_pretrain_with_a_real_three_second_budget(tmp_path, capsys):
    code = main(["pretrain", "--config", "demo", *TINY, *DATA, f"train.out_dir={tmp_path}", "train.name=cli",
                 "train.budget=3s", "train.log_every=20", "eval.initial_knn=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "time budget 3s" in out and "budget 3s:" in out
    total = int(out.split(" steps in all")[0].rsplit("-> ", 1)[1])
    sd = _ckpt(tmp_path / "cli")
    assert sd["extra"]["planned_steps"] == total and sd["step"] == total
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["finished"] and summary["total_steps"] == total
    # byol report reads the epoch length from the run, not from optim.epochs (ignored under a budget)
    import yaml

    from byol.report.rundata import read_run

    batch = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["optim"]["batch_size"]
    assert summary["steps_per_epoch"] == 48 // batch
    assert read_run(tmp_path / "cli").steps_per_epoch == summary["steps_per_epoch"]


def test_the_window_is_at_least_a_share_of_the_budget_so_a_slow_start_does_not_size_the_run():
    # 1 s per step until step 13 (another process busy at the start), then the true 0.5 s
    times, t = {}, 0.0
    for s in range(1, 200):
        t += 1.0 if s <= FIX else 0.5
        times[s] = t
    meter = BudgetMeter(1000.0, start_step=0)
    fixed = next(f for f in (meter.after_step(s, times[s]) for s in range(1, 200)) if f is not None)
    # 10 steps took 10 s, short of 5% of 1000 s: measured on to step 93 (50 s), 90 steps / 50 s
    assert (fixed.step, fixed.measured, fixed.rate) == (93, 90, 1.8)
    assert fixed.total == 93 + int((1000.0 - times[93]) * 1.8)  # 1797; from 10 steps alone: 1000
    steady = BudgetMeter(1000.0, start_step=0)
    fixed = next(f for f in (steady.after_step(s, s * STEP_S) for s in range(1, 200)) if f is not None)
    assert (fixed.step, fixed.rate, fixed.total) == (WARMUP_STEPS + 100, 2.0, 2000)  # 50 s at 2 steps/s
