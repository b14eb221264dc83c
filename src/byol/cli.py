"""The `byol` command (also `python -m byol`, the form torchrun uses).

    byol demo                                              # built-in data, kNN before vs after
    byol pretrain --config configs/cifar10_resnet18.yaml data.path=/imgs optim.epochs=200
    byol pretrain --resume runs/cifar10_resnet18-20261123-101500
    byol eval knn|linear|finetune runs/NAME [--train /imgs/train --test /imgs/test]
    byol export runs/NAME --out encoder.safetensors        # then byol.load_encoder(...)
    byol embed encoder.safetensors /imgs --out emb.npy
    byol report runs/NAME
    torchrun --nproc-per-node 8 -m byol pretrain --config imagenet_resnet50_300ep data.path=/imgs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \
        --rdzv-id r50 -m byol pretrain --config imagenet_resnet50_300ep data.path=/imgs

A user mistake (missing file, bad config value, unreadable data) prints one line on stderr and
exits with code 2; set BYOL_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import resources
from pathlib import Path

from byol.cli_eval import add_eval_parsers
from byol.cli_tools import add_tool_parsers
from byol.config import ConfigError, apply_overrides, config_from_dict, read_yaml
from byol.train.checkpoint import CheckpointWriteError
from byol.train.guard import TrainingDiverged

# Exit codes: 0 done (or stopped by train.max_steps), 2 a mistake in the input, 3 the run
# diverged (non-finite loss or weights), 4 a checkpoint could not be written, 130 interrupted.
EXIT_DIVERGED, EXIT_CHECKPOINT_WRITE = 3, 4

EXAMPLES = {
    "pretrain": "example:\n  byol pretrain --config cifar10_resnet18 data.path=/data/cifar10/train optim.epochs=200\n"
                "  byol pretrain --resume runs/cifar10_resnet18-20261123-101500",
    "demo": "example:\n  byol demo\n  byol demo optim.epochs=2 train.out_dir=/tmp/runs",
}


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("byol").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a built-in config (``demo``, ``cifar10_resnet18``, ...)."""
    path = Path(name)
    if path.exists():
        return path  # a folder is reported by read_yaml
    # `configs/x.yaml` or `x`: the shipped copy also works outside the source tree
    builtin = resources.files("byol").joinpath("configs", f"{path.stem}.yaml")
    if path.suffix in ("", ".yaml") and path.parent.name in ("", "configs") and builtin.is_file():
        return Path(str(builtin))
    raise ConfigError(f"config: file not found: {name} (built-in configs: {', '.join(builtin_configs())})")


def _print_run(result) -> bool:
    """Print where the run's outputs went (rank 0 only); -> whether this is rank 0."""
    from byol import distributed

    main = distributed.is_main()
    distributed.shutdown()  # under torchrun: every rank is done with the group
    if not main:
        return False
    run = result.run_dir
    print(f"run directory: {run}")
    print(f"  checkpoint:  {run / 'checkpoints' / 'last.pt'}")
    print(f"  metrics:     {run / 'metrics.jsonl'} (tensorboard: {run / 'tb'})")
    if result.skipped:
        print(f"  skipped {len(result.skipped)} unreadable image(s), listed in {run / 'skipped_files.tsv'}")
    if result.resumed_from is not None and result.resumed_from.name != "last.pt":
        print(f"  resumed from: {result.resumed_from}")
    if not result.finished:
        print(f"stopped at step {result.step}; continue with: byol pretrain --resume {run}")
    if result.knn_init is not None:
        print(f"kNN top-1 at random init:  {result.knn_init['top1']:.2f}%")
    if result.knn is not None:
        print(f"kNN top-1 after training:  {result.knn['top1']:.2f}%  ({run / 'eval' / 'knn.json'})")
    if result.online_linear is not None:
        print(f"online linear top-1:       {result.online_linear['top1']:.2f}%  "
              f"({run / 'eval' / 'online_linear.json'})")
    if result.collapsed_at is not None:
        print(f"warning: the projections collapsed at step {result.collapsed_at} (see z_std in "
              f"{run / 'metrics.jsonl'}); try another tau, lr or batch size")
    return True


# What a resume may change: where and how it logs and evaluates, not what it trains; and the
# peak learning rate, the remedy for a run that diverged (the schedule keeps its shape).
RESUME_MUTABLE = ("train", "eval")
RESUME_MUTABLE_KEYS = ("optim.base_lr",)


def check_resume_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0]
        if key.split(".")[0] not in RESUME_MUTABLE and key not in RESUME_MUTABLE_KEYS:
            raise ConfigError(f"--resume: {key} cannot change in a resumed run (only train.*, "
                              "eval.* and optim.base_lr can); start a new run to change it")


def resume_config(raw: dict) -> dict:
    """The run's saved config, minus the stop step of the session that wrote it: resuming a
    run stopped by ``train.max_steps`` continues to the end unless a new one is given."""
    train = dict(raw.get("train") or {})
    train.pop("max_steps", None)
    return {**raw, "train": train}


def cmd_pretrain(args) -> int:
    """`byol pretrain`: a new run from --config, or --resume RUN_DIR."""
    from byol.train.loop import pretrain

    if args.resume:
        run_cfg = Path(args.resume) / "config.yaml"
        if not Path(args.resume).is_dir():
            raise ConfigError(f"--resume: no such run directory: {args.resume}")
        if not run_cfg.is_file():
            raise ConfigError(f"--resume: {args.resume} is not a run directory (no config.yaml)")
        from byol.train.checkpoint import find_checkpoint

        find_checkpoint(args.resume)  # fail early, before building anything (which one loads is
        # decided by the run: the newest that verifies)
        cfg = config_from_dict(apply_overrides(resume_config(read_yaml(run_cfg)), args.overrides))
        check_resume_overrides(args.overrides)
        result = pretrain(cfg, resume=args.resume)
    else:
        if not args.config:
            raise ConfigError("pretrain: give --config FILE (or --resume RUN_DIR)")
        path = resolve_config_path(args.config)
        cfg = config_from_dict(apply_overrides(read_yaml(path), args.overrides))
        result = pretrain(cfg, stem=path.stem)
    _print_run(result)
    return 130 if result.interrupted else 0


def cmd_demo(args) -> int:
    """`byol demo`: pretrain on the built-in shapes, kNN before and after."""
    from byol.train.loop import pretrain

    raw = apply_overrides(read_yaml(resolve_config_path("demo")), args.overrides)
    cfg = config_from_dict(raw)
    print("byol demo: BYOL on the built-in 'shapes' data; kNN accuracy of the encoder on held-out "
          "images at random init and after training.", flush=True)
    result = pretrain(cfg, stem="demo")
    if not _print_run(result):
        return 130 if result.interrupted else 0
    if result.knn_init is not None and result.knn is not None:
        gain = result.knn["top1"] - result.knn_init["top1"]
        print(f"BYOL improved the kNN accuracy by {gain:+.2f} points.")
    if result.finished:
        from byol.report import make_report

        report = make_report(result.run_dir)
        print(f"report: {report['summary']} (plots beside it; `byol report RUN_DIR` for any run)")
    return 130 if result.interrupted else 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="byol", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="BYOL pretraining from a config", epilog=EXAMPLES["pretrain"],
                       formatter_class=fmt,
                       description="Pretrain an encoder with BYOL. Overrides are section.key=value "
                                   "(values parsed as YAML) and win over the config file.")
    p.add_argument("--config", help=f"YAML file or built-in name ({', '.join(builtin_configs())})")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="a few minutes of BYOL on built-in data, kNN before/after",
                       epilog=EXAMPLES["demo"], formatter_class=fmt,
                       description="Pretrain a small ResNet on the built-in 'shapes' dataset and "
                                   "report kNN accuracy on held-out images before and after.")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)

    add_eval_parsers(sub)
    add_tool_parsers(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:  # a DataLoader worker's error, re-raised with its traceback
        msg = re.split(r"\b\w*(?:Error|Exception): ", msg)[-1]
    return msg.splitlines()[0] if msg else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as exc:
        if os.environ.get("BYOL_DEBUG"):
            raise
        print(f"byol: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # the last good checkpoint is kept; the message says what to do
        print(f"byol: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except CheckpointWriteError as exc:
        print(f"byol: error: {_one_line(exc)}; the run stopped (free space, then resume it)", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE
    except KeyboardInterrupt:
        print("byol: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
