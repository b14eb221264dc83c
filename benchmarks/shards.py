"""Shards benchmark: images/s of an image folder vs tar shards through the real training loader.

    python benchmarks/shards.py --compare --data /work/shared/data/cifar10/train --images 5000 \
        --work /tmp/byol_shards_bench --rounds 3 --workers 0 2

``--compare`` first makes, under ``--work``, a folder of ``--images`` images (symbolic links to a
seeded, class-stratified pick from ``--data``, so both sources read the same bytes) and its shards
(``byol shard``, 1000 images a shard), then runs each source in a fresh process, alternating A B C
A B C, and prints one JSON line per run plus a line of ratios.

What is timed: one epoch (after a warm-up epoch) of the DataLoader that ``TrainBatches`` builds,
``augment.backend=batched`` (each image read, decoded to uint8 and random-resized-cropped +
flipped to [3, S, S] in the loader: what the workers do), batch ``--batch``, ``--workers``
loader processes; the photometric half on the device is the same for every source and is left out.

- folder: ``data.path=FOLDER`` (``ImageFolderDataset``: one file open per image);
- shards: ``data.path=OUT/train-{000000..N}.tar`` (``byol.data.shards.ShardDataset``, the standard
  library's tarfile for the index, one seek + read per image; the seeded shard order + buffer);
- wds: the ``webdataset`` package streaming the same shards (``WebDataset(urls, shardshuffle)``
  ``.shuffle(buffer)``, bytes decoded with ``byol.data.shards.decode_bytes``, the same crop + flip;
  ``pip install webdataset``, which byol itself does not need).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("folder", "shards", "wds")


def prepare(data: str, n: int, work: Path) -> tuple[Path, str]:
    """-> (a folder of ``n`` image links, the shards' brace pattern), made once under ``work``."""
    from byol.data.scan import scan_folder
    from byol.data.shard_write import shard_pattern, write_shards

    images, out = work / "images", work / "shards"
    if not (out / "manifest.json").is_file():
        index = scan_folder(data)
        pick = torch.randperm(len(index.files), generator=torch.Generator().manual_seed(0))[:n].tolist()
        for i in pick:
            f = index.files[i]
            link = images / f.parent.name / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(f.resolve())
        write_shards(images, out, shard_size=1000, force=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return images, shard_pattern(out, manifest)


def _config(path: str, args):
    from byol.config import load_config

    return load_config(None, [f"data.path={path}", "augment.preset=byol32", f"augment.size={args.size}",
                              "augment.backend=batched", f"optim.batch_size={args.batch}", "data.val_fraction=0",
                              f"data.num_workers={args.workers}", f"data.shuffle_buffer={args.buffer}"])


def _loader(impl: str, path: str, args):
    """-> (an iterable of one epoch of (v1, v2, labels) crops, the number of images in it)."""
    cfg = _config(path, args)
    if impl in ("folder", "shards"):
        from byol.data.pipeline import TrainBatches
        from byol.data.pretrain import build_pretrain_data

        data = build_pretrain_data(cfg)
        batches = TrainBatches(data.views, cfg, torch.device("cpu"), args.workers)

        def epoch(e):
            batches.sampler.set_epoch(e)
            return batches.loader
        return epoch, len(data.views)
    try:
        import webdataset as wds
    except ImportError:
        raise SystemExit("shards.py: --impls wds needs the webdataset package (pip install webdataset; "
                         "byol itself does not use it)") from None

    from byol.data.shards import decode_bytes, expand_shards
    from byol.data.transforms import make_views

    urls = [str(p) for p in expand_shards(path)]
    views = make_views(cfg.augment)

    def sample(s):
        key = next(k for k in s if k in ("jpg", "jpeg", "png"))
        v1, v2 = views(decode_bytes(s[key]))
        return v1, v2, int(s["cls"])
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
          .shuffle(args.buffer).map(sample))
    loader = torch.utils.data.DataLoader(ds.batched(args.batch, partial=False), batch_size=None,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    n = json.loads((Path(urls[0]).parent / "manifest.json").read_text())["total"]
    return (lambda e: loader), n


def run_one(impl: str, args) -> dict:
    torch.set_num_threads(1)
    path = args.folder if impl == "folder" else args.shards
    t0 = time.perf_counter()
    epoch, n = _loader(impl, path, args)
    open_s = time.perf_counter() - t0
    rates = []
    for e in range(args.epochs + 1):  # epoch 0: warm-up (worker start, page cache)
        t0, seen = time.perf_counter(), 0
        for v1, _, _ in epoch(e):
            seen += v1.shape[0]
        if e:
            rates.append(seen / (time.perf_counter() - t0))
    assert v1.shape[1:] == (3, args.size, args.size)
    return {"bench": "shards", "impl": impl, "images": n, "seen_per_epoch": seen, "batch": args.batch,
            "workers": args.workers, "size": args.size, "buffer": args.buffer, "epochs": args.epochs,
            "images_per_s": round(statistics.median(rates), 1), "open_s": round(open_s, 3),
            "torch": torch.__version__, "cpus": os.cpu_count(), "load1_at_end": os.getloadavg()[0]}


def compare(args) -> None:
    folder, shards = prepare(args.data, args.images, Path(args.work))
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for workers in args.workers_list:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--impl", impl, "--folder", str(folder), "--shards", shards,
                       "--batch", str(args.batch), "--size", str(args.size), "--workers", str(workers),
                       "--buffer", str(args.buffer), "--epochs", str(args.epochs)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"shards.py: {impl} failed: {proc.stderr.strip()[-800:]}")
                rec = json.loads(proc.stdout.strip().splitlines()[-1]) | {"round": r}
                print(json.dumps(rec), flush=True)
                results.setdefault((impl, workers), []).append(rec["images_per_s"])
    for workers in args.workers_list:
        med = {impl: statistics.median(results[(impl, workers)]) for impl in args.impls}
        ratios = {f"{a}/folder": round(med[a] / med["folder"], 2) for a in args.impls if a != "folder"}
        if "shards" in med and "wds" in med:
            ratios["shards/wds"] = round(med["shards"] / med["wds"], 2)
        print(json.dumps({"bench": "shards_ratios", "workers": workers, "images_per_s_median": med,
                          "ratios": ratios, "rounds": args.rounds}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--data", default="/work/shared/data/cifar10/train", help="an image folder")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--work", default="/tmp/byol_shards_bench", help="where the folder and shards go")
    parser.add_argument("--folder", help="(one run) the image folder")
    parser.add_argument("--shards", help="(one run) the shards' brace pattern")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], dest="workers_list")
    parser.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (shards, wds)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.compare:
        compare(args)
    elif args.impl:
        args.workers = args.workers_list[0]
        print(json.dumps(run_one(args.impl, args)))
    else:
        parser.error("give --compare, or --impl NAME --folder DIR --shards PATTERN (one run)")


if __name__ == "__main__":
    main()
