"""Runtime options of the tools: ``--device``, ``--compile`` and ``--tf32`` reach the model; TF32 flags are set
for float32 on CUDA only."""

from __future__ import annotations

import logging

import ase.build
import ase.io
import pytest
import torch

import potentials.export
from potentials.accel.precision import configure_tf32, tf32_enabled
from potentials.cli.main import main


class _Loaded(Exception):
    """Raised by the stand-in loader with what the tool asked for."""


@pytest.fixture
def spy_load(monkeypatch):
    def load(path, device="cpu", dtype="float32", cutoff=None, compile=None):
        raise _Loaded({"device": str(device), "dtype": str(dtype), "compile": compile})

    monkeypatch.setattr(potentials.export, "load", load)


@pytest.fixture
def structure(tmp_path):
    path = tmp_path / "cu.extxyz"
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = None
    atoms.info["energy"] = 0.0
    ase.io.write(path, atoms)
    return str(path)


TOOLS = {
    "relax": lambda s, out: ["relax", "model.pt", s, "--out", out],
    "md": lambda s, out: ["md", "model.pt", s, "--out", out, "--steps", "1"],
    "evaluate": lambda s, out: ["evaluate", "model.pt", s, "--out", out],
    "select": lambda s, out: ["select", "model.pt", s, "--out", out + ".extxyz", "--n", "1"],
    "phonons": lambda s, out: ["phonons", "model.pt", s, "--out", out],
    "elastic": lambda s, out: ["elastic", "model.pt", s, "--out", out],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize(("extra", "compile"), [([], None), (["--compile"], True), (["--no-compile"], False)])
def test_tools_pass_device_dtype_and_compile_on(tool, extra, compile, spy_load, structure, tmp_path):
    argv = TOOLS[tool](structure, str(tmp_path / "out")) + ["--device", "cuda:1", "--dtype", "float32", *extra]
    with pytest.raises(_Loaded) as got:
        main(argv)
    assert got.value.args[0] == {"device": "cuda:1", "dtype": "float32", "compile": compile}


def test_lammps_tool_has_the_runtime_options():
    from potentials.cli.main import build_parser

    args = build_parser().parse_args(["lammps", "model.pt", "in.lmp", "--types", "Cu", "--device", "cuda",
                                      "--compile", "--tf32"])
    assert (args.device, args.compile, args.tf32) == ("cuda", True, True)


@pytest.fixture
def tf32_flags():
    """The TF32 flags as they were, restored after the test (they are global to the process)."""
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield matmul, conv
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


@pytest.mark.parametrize(("device", "dtype", "why"), [("cpu", "float32", "CUDA devices only"),
                                                       ("cuda", "float64", "float32 only"),
                                                       ("cuda:0", torch.float64, "float32 only")])
def test_tf32_changes_nothing_off_cuda_or_in_float64(device, dtype, why, tf32_flags, caplog):
    with caplog.at_level(logging.WARNING, logger="potentials.accel.precision"):
        assert configure_tf32(True, device, dtype) is False
    assert why in caplog.text
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == tf32_flags
    assert not tf32_enabled()


def test_tf32_sets_the_flags_for_float32_on_cuda(tf32_flags, caplog):
    assert configure_tf32(False, "cuda", "float32") is False  # off: the flags are left alone
    assert not tf32_enabled()
    assert configure_tf32(True, "cuda", "float32") is True  # global flags: settable without a GPU
    assert tf32_enabled() and torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_tool_tf32_on_cpu_warns_and_changes_nothing(spy_load, structure, tmp_path, tf32_flags, caplog):
    with caplog.at_level(logging.WARNING, logger="potentials.accel.precision"), pytest.raises(_Loaded):
        main(["relax", "model.pt", structure, "--out", str(tmp_path / "out"), "--tf32", "--dtype", "float32"])
    assert "CUDA devices only" in caplog.text
    assert not tf32_enabled()
