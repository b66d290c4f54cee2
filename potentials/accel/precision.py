"""TF32 on CUDA: float32 matrix products and cuDNN convolutions in TensorFloat-32 (Ampere and newer GPUs).

TF32 keeps float32's exponent range and rounds the inputs of a product to a 10-bit mantissa (about 3 decimal
digits, relative error ~5e-4 per product, accumulation in float32); the tensor cores then multiply up to ~8x faster
than in float32.  It is off by default: an interatomic potential's forces are differences of energies, and the
speed-up matters only where matrix products dominate (wide models, large batches; docs/performance.md).

:func:`configure_tf32` is the one place that sets the flags: only for a CUDA device and float32 weights, and the
flags it sets are global to the process (every CUDA device).  On a CPU, or in float64, the option does nothing
and says so in a warning.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def configure_tf32(enabled: bool, device: str | torch.device, dtype: str | torch.dtype) -> bool:
    """Switch TF32 matrix products and cuDNN convolutions on when ``enabled`` and the run is float32 on CUDA.

    Returns whether TF32 is now on.  ``enabled=False`` leaves the flags as they are (PyTorch's default: full
    float32 products).  A request on a CPU device or with float64 changes nothing and logs a warning.
    """
    if not enabled:
        return False
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type != "cuda":
        log.warning("tf32 applies to CUDA devices only; on %s it changes nothing", device)
        return False
    if dtype != torch.float32:
        log.warning("tf32 applies to float32 only; with %s it changes nothing", str(dtype).removeprefix("torch."))
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # PyTorch ≥ 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("tf32: float32 matrix products and convolutions on CUDA run in TF32")
    return True


def tf32_enabled() -> bool:
    """Whether float32 matrix products on CUDA run in TF32 (the flag :func:`configure_tf32` sets)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)
