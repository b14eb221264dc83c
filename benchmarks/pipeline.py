"""Pipeline benchmark: end-to-end pretraining images/s vs the model-only step on the same config.

    python benchmarks/pipeline.py --compare --rounds 3 --config cifar10_cpu_10min \
        data.path=../shared/data/cifar10/train

``--mode model`` times ``train_step`` alone on fixed views already on the device (the model,
optimizer, precision, memory format and allocator set up as ``byol pretrain`` does them).
``--mode e2e`` runs ``byol.pretrain`` itself for ``--warmup + --steps`` steps (reading and
decoding the files, the loader, the augmentations of ``augment.backend``, the step, the online
classifier, logging, checkpoints; the kNN evaluations are switched off) and reads the images/s
of the steps after the warm-up from its metrics.jsonl. Each prints one JSON line; ``--compare``
alternates the two in fresh processes and ends with the ratio e2e/model (1.0: the input
pipeline costs nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _config(args, extra: list[str]):
    from byol.config import load_config, resolve_config_path
    return load_config(resolve_config_path(args.config), [*args.overrides, *extra])


def model_only(args) -> dict:
    from byol.train.runtime import apply_runtime, resolve_device
    from byol.train.setup import build_model_and_optimizer
    from byol.train.step import train_step

    cfg = _config(args, [])
    device = resolve_device(cfg.train.device)
    precision = apply_runtime(cfg, device)  # as byol pretrain: allocator, threads, precision
    torch.manual_seed(cfg.train.seed)
    model, opt = build_model_and_optimizer(cfg, device)
    model.train()
    if cfg.train.compile:
        model.compile()
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    b, s = cfg.optim.batch_size, cfg.augment.size
    v1, v2 = (torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt) for _ in range(2))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        stats, _ = train_step(model, opt, v1, v2, lr=0.01, tau=0.99, precision=precision)
        if (i + 1) % cfg.train.log_every == 0:
            float(stats["loss"])  # the loop's one host sync per log row
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    return {"mode": "model", "images_per_s": round(b * len(timed) / sum(timed), 1), "precision": precision}


def end_to_end(args) -> dict:
    from byol.train.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, [f"train.max_steps={args.warmup + args.steps}", f"train.out_dir={tmp}",
                             "train.name=bench", "train.progress=false", "eval.initial_knn=false",
                             "eval.final_knn=false", "eval.knn_every=0"])
        pretrain(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r and r["step"] > args.warmup]
    if not rows or args.warmup % cfg.train.log_every:
        raise SystemExit("pipeline.py: --warmup must be a multiple of train.log_every, with rows after it")
    # each row covers the steps since the previous one: images / time summed over rows
    steps = [r["step"] - p for r, p in zip(rows, [args.warmup] + [r["step"] for r in rows[:-1]])]
    images = [n * cfg.optim.batch_size for n in steps]
    seconds = sum(n / r["images_per_s"] for n, r in zip(images, rows))
    return {"mode": "e2e", "images_per_s": round(sum(images) / seconds, 1),
            "workers": cfg.data.num_workers, "backend": cfg.augment.backend}


def compare(args) -> None:
    results: dict[str, list[float]] = {"model": [], "e2e": []}
    for r in range(args.rounds):
        for mode in ("model", "e2e"):
            cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            cmd += ["--config", args.config] if args.config else []
            proc = subprocess.run([*cmd, *args.overrides], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"pipeline.py: {mode} failed: {proc.stderr.strip()[-800:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1]) | {"round": r}
            print(json.dumps(rec), flush=True)
            results[mode].append(rec["images_per_s"])
    ratio = [e / m for e, m in zip(results["e2e"], results["model"])]
    print(json.dumps({"bench": "pipeline_ratio", "e2e_over_model_median": round(statistics.median(ratio), 3),
                      "per_round": [round(x, 3) for x in ratio], "config": args.config,
                      "overrides": args.overrides, "cpus": os.cpu_count(), "torch": torch.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("model", "e2e"))
    parser.add_argument("--compare", action="store_true", help="alternate model / e2e in fresh processes")
    parser.add_argument("--config", default="demo", help="a config name or YAML file (default: demo)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of log_every)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    for name in ("steps", "rounds", "warmup"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.compare:
        compare(args)
    elif args.mode:
        rec = model_only(args) if args.mode == "model" else end_to_end(args)
        print(json.dumps({"bench": "pipeline", **rec, "config": args.config, "overrides": args.overrides}))
    else:
        parser.error("give --mode model|e2e (one run) or --compare")


if __name__ == "__main__":
    main()
