"""The `byol` command (also `python -m byol`, the form torchrun uses).

    byol demo                                              # built-in data, kNN before vs after
    byol pretrain --config configs/cifar10_resnet18.yaml data.path=/imgs optim.epochs=200
    byol pretrain --resume runs/cifar10_resnet18-20261123-101500
    byol eval knn|linear|finetune runs/NAME [--train /imgs/train --test /imgs/test]
    byol export runs/NAME --out encoder.safetensors        # then byol.load_encoder(...)
    byol import-official pretrain_res50x1.pkl --out res50x1.safetensors   # DeepMind's released weights
    byol embed encoder.safetensors /imgs --out emb.npy
    byol neighbors runs/NAME /imgs --out neighbors.png   # also: byol map runs/NAME /imgs --out map.png
    byol report runs/NAME
    byol shard /imgs --out /shards                         # tar shards: data.path='/shards/train-{000000..000009}.tar'
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

from byol.cli.data import add_data_parsers
from byol.cli.encoder import add_encoder_parsers
from byol.cli.evaluate import add_eval_parsers
from byol.cli.look import add_look_parsers
from byol.cli.report import add_report_parsers
from byol.cli.sweep import add_sweep_parsers
from byol.cli.train import add_train_parsers
from byol.files import first_oserror, refused_write
from byol.train.checkpoint import CheckpointWriteError
from byol.train.guard import TrainingDiverged

# Exit codes: 0 done (or stopped by train.max_steps), 2 a mistake in the input, 3 the run
# diverged (non-finite loss or weights), 4 the storage refused a write (a checkpoint, or any
# output: disk full, quota, read-only, file too large), 130 interrupted.
EXIT_DIVERGED, EXIT_CHECKPOINT_WRITE = 3, 4


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="byol", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parsers(sub)  # the order of `byol --help`
    add_eval_parsers(sub)
    add_encoder_parsers(sub)
    add_look_parsers(sub)
    add_report_parsers(sub)
    add_sweep_parsers(sub)
    add_data_parsers(sub)
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
        if os.environ.get("BYOL_DEBUG"):
            raise
        print(f"byol: error: {_one_line(exc)}; the run stopped (free space, then resume it)", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE
    except KeyboardInterrupt:
        print("byol: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk under an export, an embedding, a shard, an evaluation
        why = refused_write(exc)
        if why is None or os.environ.get("BYOL_DEBUG"):
            raise
        print(f"byol: error: cannot write {_written_file(exc)}: {why}; files written before are intact "
              "(free space, then run the command again)", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE


def _written_file(exc: BaseException) -> str:
    """The file a refused write was for, when an OSError in the chain names it."""
    os_error = first_oserror(exc)
    return str(os_error.filename) if os_error is not None and os_error.filename else "the output"

