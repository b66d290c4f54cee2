"""Test-session settings shared by every test directory."""

from __future__ import annotations

import os

# Tests run tiny models; one intra-op thread is fastest for them and avoids OpenMP spin-waiting when several
# processes share the machine's cores.  Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
