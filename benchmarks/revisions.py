"""Same benchmark, two revisions of the code: is a change speed-neutral?

    git worktree add /tmp/before <rev>
    python benchmarks/revisions.py --before /tmp/before --rounds 3 -- \
        benchmarks/step.py --impl ours --batch 128 --steps 10 --warmup 3 --threads 2

Runs the benchmark command (a script of this repository and its arguments, after ``--``) with
``PYTHONPATH=<tree>/src`` for the ``--before`` tree and for this one, alternating before, after,
before, after, ... in fresh processes, so that machine load spreads over both. Each run must
print JSON lines; the last one holding ``--key`` (default ``images_per_s``) is its result. Prints
one JSON line per run and a final line with the medians and the ratio after/before (1.0: no
change; > 1: faster after).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_once(tree: Path, command: list[str], key: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    script = tree / command[0]  # each tree runs its own copy of the benchmark script
    out = subprocess.run([sys.executable, str(script), *command[1:]], env=env, cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    values = [r[key] for r in rows if key in r]
    if not values:
        raise SystemExit(f"no {key!r} in the output of {' '.join(command)}:\n{out[-2000:]}")
    return float(values[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="a checkout of the earlier revision")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--key", default="images_per_s")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    results: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name, tree in (("before", args.before.resolve()), ("after", HERE)):
            value = run_once(tree, command, args.key)
            results[name].append(value)
            print(json.dumps({"round": r, "revision": name, args.key: value}), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"command": " ".join(command), f"before_{args.key}": med["before"],
                      f"after_{args.key}": med["after"], "ratio_after_over_before": med["after"] / med["before"]}))


if __name__ == "__main__":
    main()
