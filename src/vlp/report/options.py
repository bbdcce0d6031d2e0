"""The flags of `vlp report` and the call they make (`vlp.cli` only registers them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlp.errors import ConfigError


def add_report_args(p: argparse.ArgumentParser) -> None:
    from vlp.report import DEFAULT_EXAMPLES, REPORT_FILE

    p.add_argument("run_dir", help="run directory written by vlp train (log.jsonl, "
                                   "train_config.json, checkpoint-*)")
    p.add_argument("--out", help=f"HTML file to write (default: RUN_DIR/{REPORT_FILE})")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                   help="images the latest checkpoint captions, or questions it answers, for "
                        "a model that does (0: none; default: %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the examples (default: %(default)s)")


def cmd_report(args: argparse.Namespace) -> int:
    """`vlp report`: write the page, print {"out": path} as JSON."""
    print(json.dumps(report_from_args(args)))
    return 0


def report_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from vlp.report import write_report
    from vlp.train.distributed import check_device

    check_device(args.device)
    if args.examples < 0:
        raise ConfigError(f"--examples {args.examples}: expected an int >= 0")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its directory does not exist")
    path = write_report(args.run_dir, args.out, examples=args.examples, device=args.device)
    return {"out": str(path)}
