"""`byol pretrain` and `byol demo`: BYOL pretraining runs from the command line.

    byol pretrain --config cifar10_resnet18 data.path=/imgs optim.epochs=200
    byol pretrain --resume RUN_DIR [train.*=... eval.*=... optim.base_lr=...]
    byol demo                                              # built-in data, kNN before vs after
"""
from __future__ import annotations

import argparse

from byol.config import apply_overrides, builtin_configs, config_from_dict, read_yaml, resolve_config_path
from byol.config.resume import resumed_config

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "pretrain": "example:\n  byol pretrain data.path=~/photos train.budget=1h      # settings chosen for you\n"
                "  byol pretrain --config cifar10_resnet18 data.path=/data/cifar10/train optim.epochs=200\n"
                "  byol pretrain --resume runs/cifar10_resnet18-20261123-101500",
    "demo": "example:\n  byol demo\n  byol demo optim.epochs=2 train.out_dir=/tmp/runs",
}


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
        print(f"  skipped: {len(result.skipped)} record(s) of unreadable images, bad shard members or shards, "
              f"listed in {run / 'skipped_files.tsv'}")
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


def cmd_pretrain(args) -> int:
    """`byol pretrain`: a new run from --config, or --resume RUN_DIR."""
    from byol.train.pretrain import pretrain

    if args.resume:
        cfg = resumed_config(args.resume, args.overrides)  # fails before anything is built
        result = pretrain(cfg, resume=args.resume)
    else:
        path = resolve_config_path(args.config or "auto")  # auto: chosen from the data and device
        cfg = config_from_dict(apply_overrides(read_yaml(path), args.overrides))
        result = pretrain(cfg, stem=path.stem)
    _print_run(result)
    return 130 if result.interrupted else 0


def cmd_demo(args) -> int:
    """`byol demo`: pretrain on the built-in shapes, kNN before and after."""
    from byol.train.pretrain import pretrain

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


def add_train_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="BYOL pretraining from a config", epilog=EXAMPLES["pretrain"],
                       formatter_class=FMT,
                       description="Pretrain an encoder with BYOL. Overrides are section.key=value "
                                   "(values parsed as YAML) and win over the config file.")
    p.add_argument("--config", help=f"built-in name ({', '.join(builtin_configs())}) or YAML file; default: auto "
                                    "(settings chosen from the data and the device). A bare name (no slash, no "
                                    "suffix) is always the built-in config, even where a file or folder of that "
                                    "name exists; give a file as a path (./auto.yaml, my.yaml, dir/x.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="a few minutes of BYOL on built-in data, kNN before/after",
                       epilog=EXAMPLES["demo"], formatter_class=FMT,
                       description="Pretrain a small ResNet on the built-in 'shapes' dataset and "
                                   "report kNN accuracy on held-out images before and after.")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)
