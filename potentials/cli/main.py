"""The ``potentials`` command: tools around trained models (training itself is ``python train.py``)."""

from __future__ import annotations

import argparse
import sys

from potentials import __version__
from potentials.accel import tune_allocator
from potentials.cli import evaluate, md, preprocess, relax


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potentials", description=__doc__)
    parser.add_argument("--version", action="version", version=f"potentials {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    relax.add_parser(sub)
    evaluate.add_parser(sub)
    md.add_parser(sub)
    preprocess.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
