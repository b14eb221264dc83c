"""`byol shard`: an image folder as WebDataset-style tar shards plus a manifest.

    byol shard /imgs/train --out /data/shards [--shard-size 10000] [--force]
    byol pretrain --config cifar10_resnet18 data.path='/data/shards/train-{000000..000004}.tar'
"""
from __future__ import annotations

import argparse

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "shard": "example:\n  byol shard /data/cifar10/train --out /data/cifar10_shards --shard-size 10000\n"
             "  byol pretrain --config cifar10_resnet18 data.path='/data/cifar10_shards/train-{000000..000004}.tar'",
}


def cmd_shard(args) -> int:
    from byol.data.shard_write import shard_pattern, write_shards

    manifest = write_shards(args.folder, args.out, shard_size=args.shard_size, force=args.force,
                            bad_files=args.bad_files, seed=args.seed)
    classes = len(manifest["classes"])
    print(f"shards: {len(manifest['shards'])} ({manifest['total']} images"
          f"{f', {classes} classes' if classes else ', unlabelled'}) in {args.out}")
    if manifest["skipped"]:
        path, reason = manifest["skipped"][0]
        print(f"  skipped {len(manifest['skipped'])} unreadable file(s), e.g. {path}: {reason} (manifest.json)")
    print(f"  data.path={shard_pattern(args.out, manifest)}")
    return 0


def add_data_parsers(sub) -> None:
    p = sub.add_parser("shard", help="write an image folder as tar shards (data at scale)",
                       epilog=EXAMPLES["shard"], formatter_class=FMT,
                       description="Write the images of FOLDER (scanned and checked as data.path is) as "
                                   "WebDataset-style tar shards KEY.jpg (+ KEY.cls when labelled) and "
                                   "manifest.json (shard names, sample counts, sha256, class names).")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards (new or empty)")
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="images per shard (10000)")
    p.add_argument("--bad-files", choices=("skip", "fail"), default="skip",
                   help="unreadable images: skip and list them in the manifest (default), or stop")
    p.add_argument("--seed", type=int, default=0, help="seed of the order images are written in (0)")
    p.add_argument("--force", action="store_true", help="replace the shards and manifest already in --out")
    p.set_defaults(func=cmd_shard)
