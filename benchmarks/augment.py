"""Augmentation benchmark: both BYOL views of a batch, batched vs reference vs lightly's BYOLTransform.

    python benchmarks/augment.py --impl batched --batch 128 --batches 20
    python benchmarks/augment.py --compare --rounds 3 --data ../shared/data/cifar10/train

One implementation per process prints one JSON line: images/s (one image = both of its views),
median time per batch. ``--compare`` runs each in a fresh subprocess, alternating A B C A B C,
and ends with a line of ratios batched/other (> 1: batched is faster), median and best round.

What is timed: turning ``--batch`` decoded images into the two view batches [B, 3, S, S] that
the step consumes, the full T and T' of docs/method.md §3 (crop, flip, jitter in random order,
grayscale, blur, solarize, normalise; ``augment.preset=byol`` at ``--size``). Decoding is done
before timing for all three (uint8 tensors for ours, PIL images for lightly, which takes PIL).

- batched: ``augment.backend=batched``: per image random-resized-crop + flip to uint8 (what the
  loader does), stacked, then the photometric ops on the whole batch with per-sample parameters
  (``byol.data.loader.DeviceViews``), on the CPU here.
- reference: ``augment.backend=reference``: torchvision.transforms.v2 per image, both views.
- ``batched:official`` / ``reference:official``: the same two paths in
  ``augment.semantics=official`` (every op as the authors' released code computes it,
  docs/fidelity.md: one-draw crop, float bicubic resize without antialias, additive brightness,
  per-channel contrast, HSV saturation, zero-padded blur); the loader hands float32 crops over.
  The plain names run ``augment.semantics=torchvision``.
- lightly: lightly 1.6 ``BYOLTransform`` with ``BYOLView1Transform/BYOLView2Transform(input_size=S)``
  (the same distributions), per PIL image, stacked.
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

IMPLS = ("batched", "reference", "lightly", "batched:official", "reference:official")


def load_images(data: str | None, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` decoded uint8 [3, H, W] images: JPEGs of an image folder, else the built-in shapes."""
    if data is None:
        from byol.data.shapes import ShapesDataset
        ds = ShapesDataset(n, image_size=32, seed=seed)
        return [ds[i][0] for i in range(n)]
    from torchvision.io import ImageReadMode, decode_image
    files = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"augment.py: --data {data}: no .jpg/.png files found")
    g = torch.Generator().manual_seed(seed)
    picked = [files[i] for i in torch.randperm(len(files), generator=g)[:n].tolist()]
    return [decode_image(str(p), mode=ImageReadMode.RGB) for p in picked]


def build(impl: str, size: int, seed: int):
    """-> (inputs converter, batch function: list of inputs -> (v1 [B,3,S,S], v2 [B,3,S,S]))."""
    from byol.config import Augment
    from byol.data.pipeline import DeviceViews
    from byol.data.transforms import make_views

    impl, _, semantics = impl.partition(":")
    semantics = semantics or "torchvision"
    if impl == "batched":
        aug = Augment(preset="byol", size=size, backend="batched", semantics=semantics)
        crops, device_views = make_views(aug), DeviceViews(aug, seed)
        state = {"step": 0}

        def batch(images):
            pairs = [crops(x) for x in images]
            v1, v2 = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
            state["step"] += 1
            return device_views(v1, v2, state["step"])
        return (lambda x: x), batch
    if impl == "reference":
        views = make_views(Augment(preset="byol", size=size, backend="reference", semantics=semantics))

        def batch(images):
            pairs = [views(x) for x in images]
            return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        return (lambda x: x), batch
    try:
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    except ImportError:
        raise SystemExit("augment.py: --impl lightly needs lightly 1.6 (pip install lightly==1.6.0 "
                         "in a separate venv)") from None
    from torchvision.transforms.functional import to_pil_image
    transform = BYOLTransform(BYOLView1Transform(input_size=size), BYOLView2Transform(input_size=size))

    def batch(images):
        pairs = [transform(x) for x in images]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    return to_pil_image, batch


def run_one(impl: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images = load_images(args.data, args.batch * min(args.batches, 8), args.seed)
    convert, batch_fn = build(impl, args.size, args.seed)
    inputs = [convert(x) for x in images]
    chunks = [inputs[i:i + args.batch] for i in range(0, len(inputs), args.batch)]
    for i in range(args.warmup):
        batch_fn(chunks[i % len(chunks)])
    times = []
    for i in range(args.batches):
        t0 = time.perf_counter()
        v1, v2 = batch_fn(chunks[i % len(chunks)])
        times.append(time.perf_counter() - t0)
    assert v1.shape == v2.shape == (args.batch, 3, args.size, args.size) and v1.dtype == torch.float32
    return {"bench": "augment", "impl": impl, "batch": args.batch, "size": args.size,
            "threads": args.threads, "batches": args.batches,
            "images_per_s": round(args.batch * len(times) / sum(times), 1),
            "batch_ms_median": round(1000 * statistics.median(times), 1),
            "batch_ms_min": round(1000 * min(times), 1), "data": args.data or "shapes",
            "torch": torch.__version__, "cpus": os.cpu_count(), "load1_at_end": os.getloadavg()[0]}


def compare(args) -> None:
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--impl", impl, "--batch", str(args.batch),
                   "--batches", str(args.batches), "--warmup", str(args.warmup), "--size", str(args.size),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
            cmd += ["--data", args.data] if args.data else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"augment.py: {impl} failed: {proc.stderr.strip()[-500:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1]) | {"round": r}
            print(json.dumps(rec), flush=True)
            results.setdefault(impl, []).append(rec)
    ratios = {}
    ours = results.get("batched", [])
    for other in (i for i in args.impls if i != "batched" and ours):
        # batched/batched:official > 1: the official semantics' batched path is slower
        theirs = results[other]
        ratios[f"batched/{other}"] = {
            "images_per_s_median": round(statistics.median(x["images_per_s"] for x in ours)
                                         / statistics.median(x["images_per_s"] for x in theirs), 2),
            "min_batch": round(min(x["batch_ms_min"] for x in theirs) / min(x["batch_ms_min"] for x in ours), 2)}
    print(json.dumps({"bench": "augment_ratios", "ratios": ratios, "rounds": args.rounds,
                      "threads": args.threads, "size": args.size, "batch": args.batch}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--compare", action="store_true", help="run all --impls in fresh processes")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS[:3]))
    parser.add_argument("--data", help="an image folder (default: the built-in shapes, 32 px)")
    parser.add_argument("--size", type=int, default=32, help="view side in pixels")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a loader worker's budget; the loop uses all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("batch", "batches", "rounds", "threads", "size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.data and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: not a directory")
    if args.compare:
        compare(args)
    elif args.impl:
        print(json.dumps(run_one(args.impl, args)))
    else:
        parser.error("give --impl NAME (one run) or --compare")


if __name__ == "__main__":
    main()
