"""Busy-neighbour benchmark: steps/s of a CPU run alone and beside CPU-bound processes.

    python benchmarks/busy_neighbour.py --rounds 3 --steps 60
    python benchmarks/busy_neighbour.py --variants before after threads1 --busy 1

Each measurement is a fresh `byol pretrain --config demo` process (kNN off, no progress bar)
run for ``--warmup + --steps`` steps; its steps/s is the median over the metrics.jsonl rows
after the warm-up. A variant is how the process runs:

- ``before``: ``train.threads`` pinned to the core count: torch's default thread count, and the
  thread governor off (what every run did before the governor existed).
- ``after``: the defaults (``train.threads`` unset: the governor picks the threads).
- ``passive``: ``before`` with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once).
- ``threads1``: ``train.threads=1``.

``--busy N`` starts N processes that spin in pure Python (``while True: pass``) for the
"beside" measurements. Alone and beside alternate in one run, every variant in every round, so
each ratio comes from one machine state. Prints one JSON line per measurement, then a table of
medians and the ratios beside/alone and variant/before (alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("before", "after", "passive", "threads1")


def _command(variant: str, out: Path, steps: int) -> tuple[list[str], dict]:
    args = ["pretrain", "--config", "demo", f"train.max_steps={steps}", "train.log_every=5",
            "train.progress=false", "eval.initial_knn=false", "eval.final_knn=false", "eval.knn_every=0",
            "eval.online_linear=false", f"train.out_dir={out}", "train.name=run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    if variant in ("before", "passive"):
        args.append(f"train.threads={os.cpu_count()}")
    if variant == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if variant == "threads1":
        args.append("train.threads=1")
    return [sys.executable, "-m", "byol", *args], env


def measure(variant: str, steps: int, warmup: int, batch: int = 128) -> float:
    """steps/s of one fresh run after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd, env = _command(variant, Path(tmp), warmup + steps)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] / batch for r in rows if "images_per_s" in r and r["step"] > warmup]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--busy", type=int, default=1, help="spinning neighbour processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for variant in args.variants:
            for where in ("alone", "beside"):
                spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                            for _ in range(args.busy if where == "beside" else 0)]
                try:
                    rate = measure(variant, args.steps, args.warmup)
                finally:
                    for s in spinners:
                        s.kill()
                        s.wait()
                results.setdefault((variant, where), []).append(rate)
                print(json.dumps({"round": r, "variant": variant, "where": where, "steps_per_s": rate}),
                      flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med.get(("before", "alone"))
    print(f"\n| variant | alone steps/s | beside {args.busy} busy steps/s | beside/alone | alone vs before |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        alone, beside = med[(variant, "alone")], med[(variant, "beside")]
        vs = f"{alone / base:.2f}x" if base else "-"
        print(f"| {variant} | {alone:.2f} | {beside:.2f} | {beside / alone:.2f}x | {vs} |")


if __name__ == "__main__":
    main()
