"""`byol report`: the plots and summary of a run.

    byol report RUN_DIR                                    # report/*.png + report/summary.md
"""
from __future__ import annotations

import argparse

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "report": "example:\n  byol report runs/demo              # runs/demo/report/{*.png,summary.md}\n"
              "  byol report runs/demo --out /tmp/demo_report",
}


def cmd_report(args) -> int:
    from byol.report import make_report

    out = make_report(args.run, out_dir=args.out)
    print(f"report: {out['summary']}")
    for plot in out["plots"]:
        print(f"  {plot}")
    return 0


def add_report_parsers(sub) -> None:
    r = sub.add_parser("report", help="plots and summary.md of a run", epilog=EXAMPLES["report"],
                       formatter_class=FMT,
                       description="PNG plots (loss, lr and tau, collapse diagnostics, kNN and online "
                                   "linear accuracy) and summary.md (config, progress, time, images/s, "
                                   "every eval/*.json) from a run directory.")
    r.add_argument("run", metavar="RUN_DIR")
    r.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    r.set_defaults(func=cmd_report)
