"""The ``potentials`` command: training (``potentials train``, Hydra's command line) and tools around trained models."""

from __future__ import annotations

import argparse
import sys

from potentials import __version__
from potentials.accel import tune_allocator
from potentials.cli import evaluate, info, lammps, md, preprocess, properties, relax, select


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potentials", description=__doc__)
    parser.add_argument("--version", action="version", version=f"potentials {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # listed here for the help only: main() hands `train` and everything after it to Hydra before argparse runs
    sub.add_parser("train", add_help=False, help="train a potential: potentials train [group=option ...] [key=value "
                   "...]; `potentials train --help` lists the config groups")
    relax.add_parser(sub)
    evaluate.add_parser(sub)
    md.add_parser(sub)
    lammps.add_parser(sub)
    preprocess.add_parser(sub)
    properties.add_parser(sub)  # phonons, elastic, eos
    info.add_parser(sub)
    select.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from potentials.cli.train import main as train

        train(argv[1:], subcommand=["train"])
        return 0
    args = build_parser().parse_args(argv)
    tune_allocator()
    if getattr(args, "tf32", False):  # the tools with runtime options (potentials.cli.options)
        from potentials.accel.precision import configure_tf32

        configure_tf32(True, args.device, args.dtype)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
