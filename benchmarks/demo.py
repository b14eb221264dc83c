"""Wall time and kNN gain of `byol demo`, run as a user runs it (one subprocess per seed).

    python benchmarks/demo.py --seeds 0 1 2

Prints one JSON line per run and a summary line: wall seconds (process start to exit, data,
both kNN evaluations and training included), kNN top-1 at random init and after training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(seed: int, out_dir: str, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "byol", "demo", f"train.seed={seed}", f"train.out_dir={out_dir}",
         f"train.name=seed{seed}", "train.progress=false", *extra],
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"byol demo failed (seed {seed}): {proc.stderr.strip()}")
    run = Path(out_dir) / f"seed{seed}"
    before = json.loads((run / "eval" / "knn_init.json").read_text())["top1"]
    after = json.loads((run / "eval" / "knn.json").read_text())["top1"]
    return {"bench": "demo", "seed": seed, "wall_s": round(wall, 1), "knn_init": round(before, 2),
            "knn_trained": round(after, 2), "gain": round(after - before, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for byol demo")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(run_demo(seed, tmp, args.overrides))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "bench": "demo_summary", "runs": len(rows), "max_wall_s": max(r["wall_s"] for r in rows),
        "min_gain": min(r["gain"] for r in rows), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
