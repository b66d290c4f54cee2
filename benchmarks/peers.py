"""Peer frameworks: one cached virtual environment each, and the subprocess call into its worker.

Each peer (``mace``, ``fairchem``, ``nequip``) lives in ``benchmarks/.venvs/<peer>`` (git-ignored). The venv is
created on first use and re-created when its marker file is missing or records other pins than the
ones below. ``torch`` is installed first and pinned in every later step, so the peer's own
requirements cannot swap it for a multi-GB CUDA build.

Pins:
    * torch 2.13.0 (the CPU build that pip finds locally) in both venvs; fairchem-core 2.24.0 itself
      requires ``torch~=2.13.0`` and mace-torch 0.3.16 ``torch>=1.12``, so no other torch is needed.
    * mace-torch 0.3.16 (pins e3nn 0.4.4, which is why it cannot share the main venv, e3nn >= 0.5).
    * nequip 0.19.1 and nequip-allegro 0.8.3 plus ase (nequip requires ``torch>=2.2``; it brings e3nn 0.6 and
      lightning 2.6).
    * fairchem-core 2.24.0 plus ase. Its Linux requirements include ``cuda-python`` and
      ``nvidia-cutlass-dsl`` wheels (about 2.4 GB in all); these are installed, not used, on CPU.

CUDA: the torch step installs from pip's configured index (here: the CPU build). Set ``POTENTIALS_BENCH_TORCH_INDEX``
to a PyTorch wheel index (e.g. ``https://download.pytorch.org/whl/cu128``) before the venvs are built, and the torch
step installs the same pinned version from there instead (``pip install torch==2.13.0 --index-url <url>``: a CUDA
build); the index is recorded in the marker, and a venv built from another index is rebuilt while the variable is
set. Unset, any ready venv is used as it is.

A worker reads one JSON request on stdin and prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from potentials.accel.allocator import GLIBC_ENV

BENCH_DIR = Path(__file__).resolve().parent
VENV_ROOT = BENCH_DIR / ".venvs"
WORKER_DIR = BENCH_DIR / "workers"
MARKER = "potentials-peer.json"
TORCH_PIN = "torch==2.13.0"
#: Environment variable naming the package index the peer venvs' torch is installed from (a CUDA build's index).
TORCH_INDEX_ENV = "POTENTIALS_BENCH_TORCH_INDEX"


@dataclass(frozen=True)
class PeerSpec:
    """How to build and call one peer.

    Attributes:
        name: short name, also the venv folder and the ``<name>_worker.py`` prefix.
        packages: pip requirement strings installed after torch.
        distributions: distribution names whose installed versions are reported.
        smoke: Python statement that must run in the venv for it to count as ready.
    """

    name: str
    packages: tuple[str, ...]
    distributions: tuple[str, ...]
    smoke: str
    torch: str = TORCH_PIN
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pins(self) -> list[str]:
        """All requirement strings that define this venv, torch first."""
        return [self.torch, *self.packages]

    def torch_install(self, index: str | None = None) -> list[str]:
        """pip arguments of the first install step: the pinned torch, from ``index`` (a PyTorch wheel index such as
        ``https://download.pytorch.org/whl/cu128``) where given, else from pip's configured index."""
        return [self.torch, "--index-url", index] if index else [self.torch]


def torch_index() -> str | None:
    """The index of ``POTENTIALS_BENCH_TORCH_INDEX`` (None where unset or empty).

    Raises:
        PeerError: the value is not an http(s) URL.
    """
    index = os.environ.get(TORCH_INDEX_ENV, "").strip()
    if not index:
        return None
    if not index.startswith(("https://", "http://")):
        raise PeerError(f"{TORCH_INDEX_ENV}={index!r} is not a package index URL; give one such as "
                        "https://download.pytorch.org/whl/cu128 (PyTorch's wheel index for CUDA 12.8), or unset it")
    return index.rstrip("/")


PEERS: dict[str, PeerSpec] = {
    "mace": PeerSpec(
        name="mace",
        packages=("mace-torch==0.3.16",),
        distributions=("mace-torch", "torch", "e3nn", "ase", "numpy"),
        smoke="import mace.modules, torch; assert torch.__version__.startswith('2.13.0')",
    ),
    "fairchem": PeerSpec(
        name="fairchem",
        packages=("fairchem-core==2.24.0", "ase"),
        distributions=("fairchem-core", "torch", "e3nn", "ase", "numpy"),
        smoke="import fairchem.core.models.uma.escn_md, torch; assert torch.__version__.startswith('2.13.0')",
    ),
    "nequip": PeerSpec(
        name="nequip",
        packages=("nequip==0.19.1", "nequip-allegro==0.8.3", "ase"),
        distributions=("nequip", "nequip-allegro", "torch", "e3nn", "ase", "numpy", "lightning"),
        smoke="import nequip.model, allegro.model, torch; assert torch.__version__.startswith('2.13.0')",
    ),
}


class PeerError(RuntimeError):
    """A peer venv could not be built, or its worker failed."""


def venv_dir(peer: str) -> Path:
    """Folder of the venv of ``peer``."""
    return VENV_ROOT / peer


def venv_python(peer: str) -> Path:
    """Interpreter inside the venv of ``peer``."""
    return venv_dir(peer) / "bin" / "python"


def _spec(peer: str) -> PeerSpec:
    if peer not in PEERS:
        raise PeerError(f"unknown peer {peer!r}; known peers: {sorted(PEERS)}")
    return PEERS[peer]


def read_marker(peer: str) -> dict | None:
    """The marker of a ready venv (pins and installed versions), or None if absent or unreadable."""
    path = venv_dir(peer) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_ready(peer: str) -> bool:
    """True if the venv exists and its marker records the current pins (and, where ``POTENTIALS_BENCH_TORCH_INDEX``
    is set, that torch came from that index)."""
    pins = _spec(peer).pins
    marker = read_marker(peer)
    index = torch_index()
    return (bool(marker) and marker.get("pins") == pins and venv_python(peer).exists()
            and (index is None or marker.get("torch_index") == index))


def _run(cmd: list[str], log, env: dict[str, str] | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise PeerError(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")


def installed_versions(peer: str) -> dict[str, str]:
    """Versions of the peer's key distributions, read inside its venv."""
    spec = _spec(peer)
    code = (
        "import json, importlib.metadata as m, sys\n"
        f"names = {list(spec.distributions)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'absent'\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([str(venv_python(peer)), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_venv(peer: str, *, force: bool = False, python: str | None = None) -> dict:
    """Create (or re-create) the venv of ``peer`` if needed; return its marker.

    Args:
        peer: a key of ``PEERS``.
        force: rebuild even if the marker matches.
        python: base interpreter for ``python -m venv`` (default: the running one).

    Returns:
        The marker dict: ``pins`` and ``versions`` (installed distribution versions).
    """
    spec = _spec(peer)
    if is_ready(peer) and not force:
        return read_marker(peer)
    index = torch_index()
    target = venv_dir(peer)
    if target.exists():
        shutil.rmtree(target)
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    log_path = VENV_ROOT / f"{peer}-install.log"
    print(f"[peers] building {target} (log: {log_path}); this takes minutes", file=sys.stderr, flush=True)
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    with open(log_path, "w") as log:
        _run([base, "-m", "venv", str(target)], log)
        pip = [str(venv_python(peer)), "-m", "pip", "install", "--disable-pip-version-check"]
        constraints = target / "torch-constraint.txt"
        constraints.write_text(spec.torch + "\n")
        # torch first, alone (from the CUDA index where one is set): it satisfies the pin, so later steps keep it.
        _run([*pip, *spec.torch_install(index)], log)
        _run([*pip, "-c", str(constraints), *spec.pins], log)
        _run([str(venv_python(peer)), "-c", spec.smoke], log)
    marker = {"peer": peer, "pins": spec.pins, "torch_index": index, "versions": installed_versions(peer)}
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def parse_worker_output(stdout: str) -> dict:
    """The result of a worker: the last stdout line that parses as a JSON object.

    Workers may print library warnings before their result; those lines are ignored.

    Raises:
        PeerError: if no line is a JSON object, or the object reports ``"error"``.
    """
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            if "error" in result:
                raise PeerError(f"worker reported an error: {result['error']}")
            return result
    tail = "\n".join(stdout.strip().splitlines()[-5:])
    raise PeerError(f"worker printed no JSON result; last lines of its output:\n{tail}")


def reported_error(stdout: str) -> str | None:
    """The ``error`` a worker printed as its JSON result, or None if it printed none."""
    prefix = "worker reported an error: "
    try:
        parse_worker_output(stdout)
    except PeerError as exc:
        return str(exc)[len(prefix):] if str(exc).startswith(prefix) else None
    return None


def worker_env(threads: int, wait_policy: str | None = "PASSIVE", pythonpath: str | None = None,
               malloc: str = "tuned") -> dict[str, str]:
    """Environment for a worker: thread counts pinned, warnings silenced, the main project off ``sys.path``.

    ``OMP_WAIT_POLICY=PASSIVE`` (the default here) stops idle OpenMP threads from spinning: on a machine
    shared with other jobs, spinning threads of a 2-thread pool slowed every framework by 3-10x.
    ``malloc="tuned"`` gives every framework's worker the glibc settings of :mod:`potentials.accel.allocator`
    (freed memory kept for reuse: on 500 atoms 1.3x faster for eSCN-MD, 1.2x for EquiformerV2); ``"system"``
    glibc's defaults.
    """
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "POTENTIALS_MALLOC", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("MALLOC_")}
    if malloc == "tuned":
        env.update(GLIBC_ENV)
    elif malloc == "system":
        env["POTENTIALS_MALLOC"] = "system"
    else:
        raise ValueError(f"malloc must be 'tuned' or 'system', got {malloc!r}")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_worker(peer: str, request: dict, *, timeout: float = 3600.0, wait_policy: str | None = "PASSIVE",
               malloc: str = "tuned") -> dict:
    """Run ``workers/<peer>_worker.py`` with ``request`` on stdin and return its JSON result.

    Args:
        peer: a key of ``PEERS`` (run in its venv, built first if needed), or ``"ours"`` (run with this
            interpreter and the project root on ``PYTHONPATH``).
        request: JSON-serialisable dict; ``threads`` (default 2) also sets the OpenMP thread count.
        timeout: seconds before the worker is killed.
        wait_policy: ``OMP_WAIT_POLICY`` for the worker, or None to leave the environment's.
        malloc: ``"tuned"`` or ``"system"`` glibc allocator settings (see :func:`worker_env`).
    """
    if peer == "ours":
        python, pythonpath = sys.executable, str(BENCH_DIR.parent)
    else:
        ensure_venv(peer)
        python, pythonpath = str(venv_python(peer)), None
    cmd = [python, str(WORKER_DIR / f"{peer}_worker.py")]
    env = worker_env(int(request.get("threads", 2)), wait_policy, pythonpath, malloc)
    try:
        proc = subprocess.run(cmd, input=json.dumps(request), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(BENCH_DIR))
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"{peer} worker exceeded {timeout:.0f} s on task {request.get('task')!r}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        head = f"{peer} worker exited with {proc.returncode} on task {request.get('task')!r}"
        reported = reported_error(proc.stdout)  # the worker's own error first, so that reports show it
        raise PeerError(f"{head}: {reported}\n{tail}" if reported else f"{head}:\n{tail}")
    return parse_worker_output(proc.stdout)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the peer venvs (cached under benchmarks/.venvs).")
    parser.add_argument("peers", nargs="*", default=list(PEERS))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    for name in args.peers:
        print(json.dumps(ensure_venv(name, force=args.force), indent=2))
