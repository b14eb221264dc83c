"""The `byol` commands that use a run's encoder outside training (`byol eval` is in cli_eval.py).

    byol export RUN_DIR --out encoder.safetensors          # the online encoder + encoder.json
    byol embed encoder.safetensors IMAGES --out emb.npy    # features of a folder (+ emb.files.txt)
    byol report RUN_DIR                                    # report/*.png + report/summary.md
    byol sweep tau                                         # a grid of short runs -> table + plot
"""
from __future__ import annotations

import argparse

from byol.config import ConfigError

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "export": "example:\n  byol export runs/demo --out encoder.safetensors   # + encoder.json\n"
              "  python -c \"import byol; f = byol.load_encoder('encoder.safetensors')\"",
    "embed": "example:\n  byol embed encoder.safetensors /data/images --out emb.npy  # + emb.files.txt\n"
             "  byol embed runs/demo /data/images --out emb.npy",
    "report": "example:\n  byol report runs/demo              # runs/demo/report/{*.png,summary.md}\n"
              "  byol report runs/demo --out /tmp/demo_report",
    "sweep": "example:\n  byol sweep --list\n  byol sweep tau                    # runs/sweep-tau/results.{md,csv,png}\n"
             "  byol sweep augmentations data.path=/data/cifar10/train data.limit=10000\n"
             "  byol sweep batch optim.epochs=4 --out /tmp/sweep-batch   # rerun to resume",
}


def cmd_export(args) -> int:
    from byol.export import export_encoder

    out = export_encoder(args.run, args.out, which=args.which, force=args.force)
    print(f"exported the {out['which']} encoder ({out['backbone']} x{out['width']:g}, "
          f"D={out['feature_dim']}, step {out['step']}) of {out['source_checkpoint']}")
    print(f"encoder: {out['out']}\narchitecture: {out['sidecar']}")
    return 0


def cmd_embed(args) -> int:
    from byol.embed import embed_folder

    out = embed_folder(args.encoder, args.images, args.out, batch_size=args.batch_size,
                       device=args.device, workers=args.workers, progress=not args.no_progress)
    print(f"embedded {out['n']} images: [{out['n']}, {out['dim']}] float32")
    print(f"features: {out['out']}\nfiles: {out['files']}")
    if out["labels"]:
        print(f"labels: {out['labels']}")
    if out["skipped"]:
        print(f"skipped {len(out['skipped'])} unreadable files, e.g. {out['skipped'][0][0]}: "
              f"{out['skipped'][0][1]}")
    return 0


def cmd_report(args) -> int:
    from byol.report import make_report

    out = make_report(args.run, out_dir=args.out)
    print(f"report: {out['summary']}")
    for plot in out["plots"]:
        print(f"  {plot}")
    return 0


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


def add_tool_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a run's encoder as safetensors + json",
                       epilog=EXAMPLES["export"], formatter_class=FMT,
                       description="The online encoder f only (no heads, no target), as safetensors "
                                   "(loading never runs code) with its architecture in FILE.json; "
                                   "load it with byol.load_encoder(FILE).")
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--which", choices=("online", "target"), default="online",
                   help="online encoder f_theta (default) or the EMA target f_xi")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_export)

    e = sub.add_parser("embed", help="features of every image in a folder -> .npy",
                       epilog=EXAMPLES["embed"], formatter_class=FMT,
                       description="Representations y of every image under IMAGES (recursive), in "
                                   "batches, as float32 [N, D]; FILE.files.txt lists the images in row order.")
    e.add_argument("encoder", metavar="ENCODER", help="exported .safetensors, or a run dir / checkpoint")
    e.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, metavar="FILE.npy")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_embed)

    r = sub.add_parser("report", help="plots and summary.md of a run", epilog=EXAMPLES["report"],
                       formatter_class=FMT,
                       description="PNG plots (loss, lr and tau, collapse diagnostics, kNN and online "
                                   "linear accuracy) and summary.md (config, progress, time, images/s, "
                                   "every eval/*.json) from a run directory.")
    r.add_argument("run", metavar="RUN_DIR")
    r.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    r.set_defaults(func=cmd_report)

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
