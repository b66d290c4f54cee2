"""``potentials info MODEL``: what a model file holds: format, elements, cutoff, model options, physics terms,
training provenance and lineage (the base it was fine-tuned from and every dataset it saw).

``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from potentials.cli.options import add_model_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print what a model file holds: elements, options, provenance, lineage",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of sections")
    p.set_defaults(func=main)


def describe(path: str) -> dict[str, Any]:
    """The model file's sections as plain data (what ``potentials info`` prints)."""
    from ase.data import chemical_symbols

    from potentials.export import load

    potential = load(path)
    meta = dict(potential.metadata)
    meta.pop("extra", None)  # the training section under its format-1/2 name
    elements = meta.pop("elements")
    info = {
        "file": {"path": str(path), "format_version": meta.pop("format_version"),
                 "package_version": meta.pop("package_version"), "units": meta.pop("units")},
        "elements": [chemical_symbols[z] for z in elements],
        "potential": {"cutoff": potential.cutoff, "scale": float(potential.scale), "shift": float(potential.shift),
                      "atomic_energies": {chemical_symbols[z]: float(potential.atomic_energies[z])
                                          for z in elements},
                      "parameters": sum(p.numel() for p in potential.parameters())},
        "model": meta.pop("model_config"),
        "runtime": meta.pop("runtime"),
        "physics": meta.pop("physics"),
        "training": meta.pop("training"),
        "lineage": meta.pop("lineage", None),
    }
    info.update(meta)  # sections this version does not know, as written
    return info


def _print(value: Any, indent: int = 2) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v and not all(isinstance(x, (str, int, float)) for x in v):
                print(f"{pad}{k}:")
                _print(v, indent + 2)
            else:
                print(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                print(f"{pad}-")
                _print(v, indent + 2)
            else:
                print(f"{pad}- {_scalar(v)}")
    else:
        print(f"{pad}{_scalar(value)}")


def _scalar(v: Any) -> str:
    if isinstance(v, dict):
        return json.dumps(v) if v else "{}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "[]"
    return "none" if v is None else str(v)


def main(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for section, value in info.items():
        if value is None:
            print(f"{section}: none")
        elif isinstance(value, (dict, list)):
            print(f"{section}:")
            _print(value)
        else:
            print(f"{section}: {value}")
    return 0
