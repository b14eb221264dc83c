"""`byol eval knn|linear|finetune`: every evaluation protocol of docs/method.md §5 from the command line.

Every eval command takes --train DIR --test DIR (labelled folders: transfer to another dataset)
or neither (the run's own held-out split), and --random-init (an untrained encoder of the same
architecture: the floor). Protocols and defaults: docs/evaluation.md.

Instead of a run, an exported encoder (``byol export``, ``byol import-official``: FILE.safetensors)
or a released BYOL checkpoint (FILE.pkl) is evaluated the same way, on --train and --test folders
(it has no data of its own); results are printed, not written.
"""
from __future__ import annotations

import argparse

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "knn": "example:\n  byol eval knn runs/demo --train /data/train --test /data/test\n"
           "  byol eval knn runs/demo            # the run's own held-out split",
    "linear": "example:\n  byol eval linear runs/demo                      # fast: cached features, sweep\n"
              "  byol eval linear runs/demo --protocol paper --epochs 80\n"
              "  byol eval linear runs/demo --train /data/c100/train --test /data/c100/test\n"
              "  byol eval linear runs/demo --random-init          # the untrained floor",
    "finetune": "example:\n  byol eval finetune runs/demo --labels-fraction 0.01\n"
                "  byol eval finetune runs/other --labels-file runs/demo/eval/labels_1pct_seed0_heldout.txt",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT|ENCODER",
                   help="a run directory, a checkpoint, an exported encoder (.safetensors) or a released "
                        "BYOL checkpoint (.pkl)")
    p.add_argument("--train", help="labelled folder to train/fit on (default: the run's train split)")
    p.add_argument("--test", help="labelled folder to test on (default: the run's held-out split)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate an untrained encoder of the same architecture (the floor)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: by machine)")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def top5_text(out: dict) -> str:
    """", top-5 X%" where top-5 means something (more than 5 classes), else nothing."""
    return f", top-5 {out['top5']:.2f}%" if out.get("top5") is not None else ""


def _print_result(name: str, out: dict) -> None:
    floor = " (random-init encoder)" if out.get("random_init") else ""
    print(f"{name}{floor}: top-1 {out['top1']:.2f}%{top5_text(out)} on {out['n_test']} test images")
    if out.get("written_to"):
        print(f"results: {out['written_to']}")


def _run(args):
    """The run the eval commands take: ``args.run`` (a run dir or checkpoint), or for an encoder file
    (an export, a release checkpoint) the run ``byol.export.export_as_run`` makes of it; an encoder
    has no held-out split of its own, so it needs --train and --test."""
    from byol.data.errors import DataError
    from byol.export import export_as_run, is_encoder_file

    if not is_encoder_file(args.run):
        return args.run
    if args.train is None or args.test is None:
        raise DataError(f"eval {args.protocol_name}: {args.run} is an encoder without data of its own; "
                        "give --train and --test folders")
    return export_as_run(args.run)


def cmd_eval_knn(args) -> int:
    from byol.eval.commands import knn_command

    out = knn_command(_run(args), train=args.train, test=args.test, k=args.k,
                      temperature=args.temperature, batch_size=args.batch_size,
                      device=args.device, workers=args.workers, random_init=args.random_init,
                      seed=args.seed)
    floor = " (random-init encoder)" if args.random_init else ""
    print(f"kNN{floor} (k={out['k']}, T={out['temperature']}): top-1 {out['top1']:.2f}%{top5_text(out)} "
          f"on {out['n_test']} images (bank {out['n_bank']})")
    if out.get("written_to"):
        print(f"results: {out['written_to']}")
    return 0


# flags that only one protocol of `eval linear` reads: given to the other, they are a mistake
FAST_ONLY = {"val_fraction": "--val-fraction", "lrs": "--lrs", "weight_decays": "--weight-decays",
             "no_cache": "--no-cache"}
PAPER_ONLY = {"base_lr": "--base-lr"}


def _check_protocol_flags(args) -> None:
    from byol.config import ConfigError

    other = FAST_ONLY if args.protocol == "paper" else PAPER_ONLY
    for key, flag in other.items():
        if getattr(args, key) not in (None, False):
            raise ConfigError(f"eval linear: {flag} does not apply to --protocol {args.protocol}")


def cmd_eval_linear(args) -> int:
    _check_protocol_flags(args)
    run = _run(args)
    common = dict(train=args.train, test=args.test, device=args.device, workers=args.workers,
                  seed=args.seed, random_init=args.random_init)
    if args.protocol == "paper":
        from byol.eval.finetune import paper_linear_command

        out = paper_linear_command(run, epochs=80 if args.epochs is None else args.epochs,
                                   batch_size=256 if args.batch_size is None else args.batch_size,
                                   base_lr=0.2 if args.base_lr is None else args.base_lr, **common)
        _print_result(f"linear (paper protocol, {out['epochs']} epochs)", out)
        return 0
    from byol.eval.linear import fast_linear_command

    out = fast_linear_command(run, val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                              lrs=args.lrs,
                              weight_decays=args.weight_decays, epochs=args.epochs,
                              batch_size=args.batch_size, cache=not args.no_cache, **common)
    _print_result(f"linear (fast: frozen features, lr {out['lr']:g}, wd {out['weight_decay']:g})", out)
    return 0


def cmd_eval_finetune(args) -> int:
    from byol.eval.finetune import finetune_command

    out = finetune_command(_run(args), labels_fraction=args.labels_fraction, labels_file=args.labels_file,
                           train=args.train, test=args.test, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           device=args.device, workers=args.workers, seed=args.seed,
                           random_init=args.random_init)
    _print_result(f"fine-tuned on {out['n_labelled']} labelled images "
                  f"({100 * out['labelled_fraction']:.3g}% of the train split)", out)
    print(f"labelled subset: {out['subset_file']}")
    return 0


def add_eval_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a pretrained encoder (knn, linear, finetune)",
                       description=__doc__, formatter_class=FMT)
    esub = p.add_subparsers(dest="protocol_name", required=True)

    k = esub.add_parser("knn", help="weighted kNN on frozen features", epilog=EXAMPLES["knn"],
                        formatter_class=FMT,
                        description="Weighted kNN (cosine, exp(s/T) votes) with the frozen online "
                                    "encoder of a run directory or checkpoint.")
    _common(k)
    k.add_argument("--seed", type=int, default=0, help="init of the --random-init encoder")
    k.add_argument("--k", type=int, default=None, help="neighbours (default: the run's eval.knn_k)")
    k.add_argument("--temperature", type=float, default=None, help="default: eval.knn_temperature")
    k.add_argument("--batch-size", type=int, default=None)
    k.set_defaults(func=cmd_eval_knn)

    lin = esub.add_parser(
        "linear", help="linear evaluation of the frozen encoder (fast or paper protocol)",
        epilog=EXAMPLES["linear"], formatter_class=FMT,
        description="fast (default): features of the frozen encoder extracted once (cached in "
                    "RUN_DIR/eval/feature_cache), a logistic regression swept over lr and weight decay "
                    "on a validation part of the train split, refit, tested.\n"
                    "paper: docs/method.md §5, frozen encoder, random crop + flip, SGD Nesterov 0.9, "
                    "lr 0.2 x batch/256 cosine, no weight decay, 80 epochs.")
    _common(lin)
    lin.add_argument("--protocol", choices=("fast", "paper"), default="fast")
    lin.add_argument("--epochs", type=int, default=None, help="default: 100 (fast), 80 (paper)")
    lin.add_argument("--batch-size", type=int, default=None, help="default: 1024 (fast), 256 (paper)")
    lin.add_argument("--base-lr", type=float, default=None, help="paper: lr = base_lr x batch / 256 (0.2)")
    lin.add_argument("--val-fraction", type=float, default=None,
                     help="fast: share of the train split held out to choose lr and wd (0.1)")
    lin.add_argument("--lrs", type=_floats, default=None, help="fast: comma-separated lrs to sweep")
    lin.add_argument("--weight-decays", type=_floats, default=None, help="fast: comma-separated")
    lin.add_argument("--no-cache", action="store_true", help="fast: do not read or write the feature cache")
    lin.add_argument("--seed", type=int, default=0)
    lin.set_defaults(func=cmd_eval_linear)

    ft = esub.add_parser("finetune", help="fine-tune encoder + linear head on a fraction of the labels",
                         epilog=EXAMPLES["finetune"], formatter_class=FMT,
                         description="Semi-supervised evaluation (docs/method.md §5): a class-balanced, "
                                     "seeded subset of the train split's labels, saved as a file list; "
                                     "encoder + head trained end to end, SGD Nesterov, cosine lr.")
    _common(ft)
    g = ft.add_mutually_exclusive_group()
    g.add_argument("--labels-fraction", type=float, default=0.1, help="class-balanced share of the labels")
    g.add_argument("--labels-file", help="reuse a saved subset (one sample id per line)")
    ft.add_argument("--epochs", type=int, default=30)
    ft.add_argument("--batch-size", type=int, default=256)
    ft.add_argument("--lr", type=float, default=0.01, help="peak lr, cosine to 0 (not batch-scaled)")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--seed", type=int, default=0, help="subset draw, head init, order, augmentation")
    ft.set_defaults(func=cmd_eval_finetune)
