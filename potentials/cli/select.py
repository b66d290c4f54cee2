"""``potentials select MODEL FRAMES --n 50 --out to_label.extxyz``: the frames to label next.

MODEL must have uncertainty (a committee or shallow ensemble, docs/uncertainty.md). Every frame of FRAMES (any
file ASE reads: an MD trajectory, extxyz) is scored by its maximum per-atom force std; the N highest are written,
skipping frames within --min-distance Å (RMS displacement) of one already picked, so that one event's consecutive
frames are not all chosen. Each written frame carries ``max_force_std`` and its ``source_index`` in ``info``.
"""

from __future__ import annotations

import argparse
import sys

from potentials.cli.options import add_model_argument, add_runtime_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="pick the most uncertain, diverse frames for new reference labels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("frames", help="candidate frames: an MD trajectory, extxyz, ... (any file ASE reads)")
    p.add_argument("--n", type=int, default=50, help="frames to pick (default 50)")
    p.add_argument("--out", default="to_label.extxyz", help="output file (default to_label.extxyz)")
    p.add_argument("--min-distance", type=float, default=0.1,
                   help="Å: skip a frame closer than this (RMS displacement) to a picked one (default 0.1; 0: off)")
    p.add_argument("--index", default=":", help="frames to consider, as in ase.io.read (default ':')")
    add_runtime_options(p, "float32", "enough to rank frames")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import ase.io

    from potentials.calculator import PotentialCalculator
    from potentials.errors import PotentialsInputError
    from potentials.select import frame_scores, select_frames
    from potentials.structure_io import read_structures

    try:
        frames = read_structures(args.frames, args.index)
        calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
                                           compile=args.compile)
        scores = frame_scores(frames, calc)
        chosen = select_frames(frames, scores, args.n, args.min_distance)
    except (FileNotFoundError, ValueError, PotentialsInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = []
    for k in chosen.indices:
        atoms = frames[k].copy()
        atoms.calc = None
        atoms.info.update({"max_force_std": float(scores[k]), "source_index": int(k)})
        out.append(atoms)
    ase.io.write(args.out, out, format="extxyz")
    print(f"{len(out)} of {len(frames)} frames picked (max force std {scores[chosen.indices].min():.4g} to "
          f"{scores[chosen.indices].max():.4g} eV/Å; {chosen.skipped_as_similar} skipped as within "
          f"{args.min_distance} Å of a pick) → {args.out}")
    return 0
