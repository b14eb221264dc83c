"""``byol sweep``: the paper's ablations (docs/method.md §7, §8) as named grids of short runs."""
from byol.sweep.grids import GRIDS, SHORT, Cell, Grid
from byol.sweep.runner import run_sweep

__all__ = ["GRIDS", "SHORT", "Cell", "Grid", "run_sweep"]
