"""`byol sweep`: a named grid of short runs (the ablations of docs/method.md §7, §8).

    byol sweep tau                                         # a grid of short runs -> table + plot
"""
from __future__ import annotations

import argparse

from byol.config import ConfigError

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "sweep": "example:\n  byol sweep --list\n"
             "  byol sweep tau                    # runs/sweep-tau/results.{md,csv,png}\n"
             "  byol sweep augmentations data.path=/data/cifar10/train data.limit=10000\n"
             "  byol sweep batch optim.epochs=4 --out /tmp/sweep-batch   # rerun to resume",
}


def cmd_sweep(args) -> int:
    from byol.sweep import GRIDS, SHORT, run_sweep

    if args.list:
        print("grids (byol sweep NAME [section.key=value ...]):")
        for grid in GRIDS.values():
            print(f"  {grid.name:14s} {len(grid.cells)} cells: {grid.question}")
        print("every cell: the demo config + " + " ".join(f"{k}={v}" for k, v in SHORT.items()))
        return 0
    if not args.grid:
        raise ConfigError(f"sweep: name a grid ({', '.join(GRIDS)}); byol sweep --list describes them")
    if any(a.startswith("--") for a in args.overrides):
        raise ConfigError(f"sweep: unknown option {next(a for a in args.overrides if a.startswith('--'))}")
    if args.no_progress:
        args.overrides.append("train.progress=false")
    out = run_sweep(args.grid, args.overrides, out=args.out)
    for kind, path in out["outputs"].items():
        print(f"{kind}: {path}")
    if out["interrupted"]:
        print(f"interrupted: rerun `byol sweep {args.grid}` with the same arguments to continue")
        return 130
    return 0 if out["complete"] else 1


def add_sweep_parsers(sub) -> None:
    w = sub.add_parser("sweep", help="a named grid of short runs (the paper's ablations) -> table + plot",
                       epilog=EXAMPLES["sweep"], formatter_class=FMT,
                       description="Runs each cell of grid NAME (demo data unless data.path= is given), "
                                   "evaluates it with kNN and the collapse monitors, and writes "
                                   "OUT/results.{csv,md,png}. Rerunning continues where it stopped: "
                                   "finished cells are not rerun.")
    w.add_argument("grid", nargs="?", metavar="NAME", help="tau | predictor | augmentations | "
                   "normalization | batch | objective")
    w.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every cell")
    w.add_argument("--out", default=None, metavar="DIR", help="default: runs/sweep-NAME")
    w.add_argument("--list", action="store_true", help="list the grids and exit")
    w.add_argument("--no-progress", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_sweep)
