"""The allocator tuning: freed large blocks are reused instead of being faulted in afresh every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MB tensor over and over (as each training or MD step does with its activations); count
# the page faults of nine rounds after a warm-up (the tuned heap settles within ~10 rounds).  Without tuning every
# round faults all 16 384 pages in again.
PROBE = """
import json, resource, sys
import torch
from potentials.accel import tune_allocator
applied = tune_allocator()
for _ in range(20):
    torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    torch.ones(16 << 20).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(**env: str) -> dict:
    dropped = ("POTENTIALS_MALLOC", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in dropped}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**full_env, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is Linux-only")
def test_tuned_allocator_reuses_freed_pages():
    tuned, system = _probe(), _probe(POTENTIALS_MALLOC="system")
    assert tuned["applied"] is True and system["applied"] is False
    # the untuned allocator faults the tensors in afresh each round (9 × 16 384 pages of 4 kB; fewer with huge pages)
    assert system["faults"] > 1000, system
    assert tuned["faults"] < 0.02 * system["faults"], (tuned, system)


def test_calculator_tunes_the_allocator(monkeypatch):
    from potentials.calculator import PotentialCalculator
    from potentials.models.egnn import EGNN
    from potentials.potential import Potential

    calls = []
    monkeypatch.setattr("potentials.calculator.tune_allocator", lambda: calls.append(1))
    PotentialCalculator(Potential(EGNN(cutoff=3.0, channels=4, num_layers=1), cutoff=3.0))
    assert calls == [1]
