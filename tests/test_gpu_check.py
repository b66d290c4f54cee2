"""scripts/gpu_check.sh stops within seconds, with a message saying why, where no GPU can run it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def _fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPU_REPORT": str(tmp_path / "report"), **env})
    return proc, time.perf_counter() - start


def test_no_gpu_fails_fast(tmp_path):
    """nvidia-smi finding no device (as here, or missing): exit 2 before anything slow, nothing written."""
    _fake(tmp_path, "nvidia-smi", "echo 'No devices were found' >&2; exit 6")
    proc, seconds = _run(tmp_path, {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 2
    assert "no NVIDIA GPU on this machine" in proc.stderr
    assert seconds < 10
    assert not (tmp_path / "report").exists()


def test_torch_without_cuda_fails_fast(tmp_path):
    """A GPU listed but a torch that sees no CUDA device: exit 2, naming the torch build."""
    _fake(tmp_path, "nvidia-smi", "echo 'GPU 0: a device'")
    _fake(tmp_path, "python-no-cuda", f'CUDA_VISIBLE_DEVICES="" exec "{sys.executable}" "$@"')
    proc, seconds = _run(tmp_path, {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                                    "PYTHON": str(tmp_path / "python-no-cuda")})
    assert proc.returncode == 2
    assert "sees no CUDA device" in proc.stderr and "torch 2." in proc.stderr
    assert seconds < 60  # one torch import, on a busy machine
    assert not (tmp_path / "report").exists()
