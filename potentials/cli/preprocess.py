"""``potentials preprocess DATA_CONFIG OUT [KEY=VALUE ...]``: convert a dataset into a graph store on disk.

DATA_CONFIG is a data config name from the package's ``potentials/conf/data`` (``emt``, ``md17``, ``ase``, ...) or
the path of such a yaml file. KEY=VALUE pairs override the data config the way ``data.KEY=VALUE`` does for
``potentials train`` (``path=...``, ``source.n_structures=100``; a leading ``data.`` is accepted too), except the
shared top-level keys ``cutoff``, ``dtype``, ``seed``, ``data_root`` and ``run_dir`` (default: OUT, where an
adapter's report of skipped records lands), which are set as in ``potentials train``. The store holds the graphs at
``cutoff`` (Å) in ``dtype``. Rerunning an interrupted command resumes it; train with
``potentials train data=store data.path=OUT``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path

import yaml

from potentials.conf import CONFIG_DIR

#: Top-level keys of train.yaml that data configs interpolate; every other KEY belongs to the data config.
TOP_LEVEL_KEYS = ("cutoff", "dtype", "seed", "data_root", "run_dir")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="convert a dataset into a graph store for data=store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_config", help="data config name (emt, md17, ase, ...) or path of a data config yaml")
    p.add_argument("out", help="store directory to create (or to finish, when a conversion was interrupted)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data config overrides (path=..., source.index=...) and cutoff=, dtype=, seed=, data_root=")
    p.add_argument("--no-edges", action="store_true",
                   help="store positions and labels only; edges are built when reading (about 10x smaller)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave invalid frames out (counted and listed in the manifest) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="delete an existing store at OUT first")
    p.add_argument("--workers", type=int, default=0, help="processes that build graphs (default 0: this one)")
    p.add_argument("--commit-every", type=int, default=1000,
                   help="frames per transaction; an interruption loses at most this many (default 1000)")
    p.set_defaults(func=main)


def compose_data_config(spec: str, overrides: list[str], run_dir: str | None = None):
    """The training config (``train.yaml`` of the package) with ``data`` taken from ``spec`` and the overrides applied.

    ``run_dir`` (which data configs may use for reports, e.g. of skipped records) defaults to the store directory.

    Raises:
        SystemExit: unknown config name, unreadable yaml, malformed or unknown override key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    top, data = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        key = key.removeprefix("data.")
        (top if key in TOP_LEVEL_KEYS else data).append((key, value))
    path = Path(spec)
    in_tree = path.suffix in (".yaml", ".yml") and path.resolve().parent == CONFIG_DIR / "data"
    name = path.stem if in_tree or path.suffix not in (".yaml", ".yml") else None
    choices = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    if name is None and not path.is_file():
        raise SystemExit(f"error: data config file {spec} not found")
    if name is not None and name not in choices:
        raise SystemExit(f"error: no data config {name!r}; choose one of {choices} or give a yaml path")
    if run_dir is not None and "run_dir" not in dict(top):
        top.append(("run_dir", run_dir))
    hydra_overrides = [f"{k}={v}" for k, v in top] + ([f"data={name}"] if name else [])
    hydra_overrides += [f"data.{k}={v}" for k, v in data] if name else []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=hydra_overrides)
        if name is None:
            loaded = OmegaConf.load(path)
            if "defaults" in loaded:
                raise SystemExit(f"error: {spec} has a defaults list, which a data config given as a path cannot use; "
                                 "write the values it pulls in into the file")
            with open_dict(cfg):
                cfg.data = loaded
            OmegaConf.set_struct(cfg, True)
            for key, value in data:
                OmegaConf.update(cfg, f"data.{key}", yaml.safe_load(value), merge=True)
        OmegaConf.resolve(cfg.data)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise SystemExit(f"error: cannot compose the data config {spec!r} with {overrides}: {err}") from None
    return cfg


def _strings_in(node) -> list[str]:
    """Every non-empty string value of a (nested) config: candidate paths of the source files."""
    if isinstance(node, dict):
        return [p for v in node.values() for p in _strings_in(v)]
    if isinstance(node, (list, tuple)):
        return [p for v in node for p in _strings_in(v)]
    return [node] if isinstance(node, str) and node else []


def main(args: argparse.Namespace) -> int:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from potentials.datasets.preprocess import convert
    from potentials.datasets.store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose_data_config(args.data_config, list(args.overrides), run_dir=str(Path(args.out).resolve()))
    if cfg.data.get("source") is None:
        raise SystemExit(f"error: data config {args.data_config!r} has no adapter (source:) to convert")
    source_config = OmegaConf.to_container(cfg.data.source, resolve=True)
    argv = ["potentials", "preprocess", args.data_config, args.out, *args.overrides]
    argv += [flag for flag, on in (("--no-edges", args.no_edges), ("--skip-invalid", args.skip_invalid)) if on]
    started = time.perf_counter()
    try:
        source = instantiate(cfg.data.source)
        manifest = convert(
            source, args.out, cutoff=float(cfg.cutoff), dtype=str(cfg.dtype), edges=not args.no_edges,
            skip_invalid=args.skip_invalid, commit_every=args.commit_every, workers=args.workers,
            overwrite=args.overwrite, source_config=source_config,
            search_paths=_strings_in(source_config) + _strings_in(cfg.data.get("path")), command=shlex.join(argv),
        )
    except (StoreError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    seconds = time.perf_counter() - started
    n = manifest["num_records"]
    print(f"graph store     {args.out}")
    print(f"records         {n} ({manifest['num_atoms']} atoms, {manifest['num_edges']} edges at "
          f"{manifest['cutoff']} Å{'' if manifest['edges'] else ' (not stored)'}, {manifest['dtype']})")
    print(f"size            {manifest['bytes'] / 2**20:.1f} MiB")
    print(f"skipped         {manifest['num_skipped']}")
    for entry in manifest["skipped"][:10]:
        print(f"  - {entry['where']}: {entry['error']}")
    if manifest["num_skipped"] > 10:
        print(f"  ... all listed in {Path(args.out) / 'manifest.json'}")
    print(f"time            {seconds:.1f} s")
    print(f"train with      potentials train data=store data.path={args.out}")
    return 0

