"""`byol sweep`: every grid resolves, cells run and are tabulated, finished cells are not rerun,
a stopped cell resumes, and mixing settings in one folder is refused."""
from __future__ import annotations

import csv
import json

import pytest

from byol.cli import main
from byol.config import apply_overrides, config_from_dict, read_yaml, resolve_config_path
from byol.config.sections import ConfigError
from byol.sweep import GRIDS, run_sweep
from byol.sweep.runner import cell_overrides

# tiny cells: 64 shapes at 32 px, batch 16, one epoch
SMALL = ["model.width=0.125", "model.projector_hidden=32", "model.projector_out=16",
         "model.predictor_hidden=32", "optim.batch_size=16", "optim.epochs=1", "data.shapes_size=64",
         "eval.knn_k=5", "train.threads=1", "train.progress=false"]


@pytest.mark.parametrize("name", list(GRIDS))
def test_every_cell_of_every_grid_is_a_valid_config_that_differs(name):
    grid = GRIDS[name]
    base = read_yaml(resolve_config_path("demo"))
    configs = [config_from_dict(apply_overrides(base, cell_overrides(grid, c.label, [])))
               for c in grid.cells]
    assert len({c.label for c in grid.cells}) == len(grid.cells) >= 5
    assert len({repr(c) for c in configs}) == len(configs)  # no two cells are the same run
    assert all(c.optim.epochs == 8 and c.eval.initial_knn for c in configs)
    # a fixed length at 32 px, not the demo's time budget on 16-px crops
    assert all(c.train.budget is None and c.augment.size == 32 and c.augment.eval_px == 32 for c in configs)


def test_data_path_points_every_cell_at_a_folder():
    items = cell_overrides(GRIDS["tau"], "tau_0", ["data.path=/imgs"])
    assert "data.dataset=folder" in items and items[-1] == "data.path=/imgs"
    assert "data.dataset=folder" not in cell_overrides(GRIDS["tau"], "tau_0", ["data.path=/x", "data.dataset=shapes"])


def test_sweep_runs_tabulates_and_does_not_rerun_finished_cells(tmp_path):
    out = tmp_path / "tau"
    first = run_sweep("tau", SMALL, out=out, log=lambda *_: None)
    assert first["complete"] and not first["interrupted"]
    grid = GRIDS["tau"]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["cell"] for r in rows] == [c.label for c in grid.cells]
    assert all(float(r["knn_init_top1"]) >= 0 and r["z_std"] for r in rows)
    md = (out / "results.md").read_text()
    assert "| tau_0 |" in md and "results.png" in md and "tau_base" in md
    assert (out / "results.png").stat().st_size > 1000
    stamps = {c.label: (out / c.label / "metrics.jsonl").stat().st_mtime_ns for c in grid.cells}
    said = []
    again = run_sweep("tau", SMALL, out=out, log=said.append)
    assert again["complete"] and sum("not rerun" in s for s in said) == len(grid.cells)
    assert stamps == {c.label: (out / c.label / "metrics.jsonl").stat().st_mtime_ns for c in grid.cells}
    with pytest.raises(ConfigError, match="was run with overrides"):
        run_sweep("tau", SMALL + ["optim.base_lr=0.3"], out=out)
    with pytest.raises(ConfigError, match="holds the 'tau' grid"):
        run_sweep("predictor", SMALL, out=out)


def test_a_stopped_cell_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "objective"
    part = run_sweep("objective", SMALL + ["train.max_steps=2"], out=out, log=lambda *_: None)
    assert not part["complete"] and not part["rows"]
    log = (out / "pred_target_beta_0" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert max(steps) == 2
    said = []
    done = run_sweep("objective", SMALL, out=out, log=said.append)
    assert done["complete"] and sum("resuming" in s for s in said) == len(GRIDS["objective"].cells)
    assert all(row["steps"] == 3 for row in done["rows"])  # 48 training images / 16 per step


def test_cli_lists_grids_and_names_a_bad_one(capsys):
    assert main(["sweep", "--list"]) == 0
    assert "normalization" in capsys.readouterr().out
    assert main(["sweep", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown grid 'nope'" in err
    assert main(["sweep"]) == 2 and "name a grid (tau," in capsys.readouterr().err


def test_a_cell_killed_before_its_first_checkpoint_starts_over(tmp_path):
    # a first attempt with a mistake that fails before any cell starts may be corrected
    with pytest.raises(Exception, match="data.path"):
        run_sweep("tau", SMALL + ["data.path=/no/such/folder"], out=tmp_path / "a", log=lambda *_: None)
    assert not any(p.is_dir() for p in (tmp_path / "a").iterdir())
    out = tmp_path / "b"
    killed = out / "tau_0"  # what a SIGKILL in the first epoch leaves: a run without checkpoints
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("{}\n")
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    said = []
    done = run_sweep("tau", SMALL + ["eval.initial_knn=false"], out=out, log=said.append)
    assert done["complete"] and not any("resuming" in s for s in said)
    assert all(row["knn_init_top1"] is None and row["knn_top1"] is not None for row in done["rows"])
    assert any("random init -" in s for s in said)
    # the folder of the failed attempt takes the corrected overrides: no cell had started
    assert run_sweep("tau", SMALL, out=tmp_path / "a", log=lambda *_: None)["complete"]


def test_a_cell_that_diverges_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "normalization"
    # plain SGD at a huge rate: the cells without any normalisation go non-finite, BN cells do not
    explode = [*SMALL, "optim.name=sgd", "optim.base_lr=1e4", "train.precision=fp32", "eval.knn_every=0"]
    done = run_sweep("normalization", explode, out=out, log=lambda *_: None)
    assert done["complete"]
    rows = {r["cell"]: r for r in done["rows"]}
    diverged = [c for c, r in rows.items() if r["diverged_at"] is not None]
    assert diverged and len(diverged) < len(rows)
    for cell in diverged:
        assert rows[cell]["knn_top1"] is None  # no final kNN from a diverged network
        assert json.loads((out / cell / "summary.json").read_text())["diverged"]
    assert "diverged at" in (out / "results.md").read_text()
    again = run_sweep("normalization", explode, out=out, log=lambda *_: None)  # recorded: not rerun
    assert {r["cell"]: r["diverged_at"] for r in again["rows"]} == {c: r["diverged_at"] for c, r in rows.items()}
