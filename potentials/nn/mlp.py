"""Plain multilayer perceptrons."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(sizes: Sequence[int], act: type[nn.Module] = nn.SiLU, last_act: bool = False, bias: bool = True
        ) -> nn.Sequential:
    """Linear layers of widths ``sizes[0] → … → sizes[-1]`` with ``act`` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if k < len(sizes) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)
