"""``potentials info MODEL``: what a model file holds: format, elements, cutoff, model options, physics terms,
training provenance and lineage (the base it was fine-tuned from and every dataset it saw), and for a mix trained
with per-dataset reference energies every dataset's table (``references``).

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
    references = meta.pop("references", None)  # a mix with per-dataset reference energies: every dataset's table
    if references is not None:
        info["references"] = {**references, "tables": {
            name: {chemical_symbols[int(z)]: float(e) for z, e in table.items()}
            for name, table in (references.get("tables") or {}).items()}}
    info.update(meta)  # sections this version does not know, as written
    return info


def main(args: argparse.Namespace) -> int:
    import yaml

    from potentials.training.finetune import _plain

    info = _plain(describe(args.model))
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    # YAML: one section per top-level key, short lists and leaf mappings on one line
    print(yaml.safe_dump(info, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120), end="")
    return 0
