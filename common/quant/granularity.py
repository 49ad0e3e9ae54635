"""Granularities: which tensor dimensions own a separate scale / zero-point.

A granularity maps a tensor shape to the shape of its quantization parameters: kept dimensions
keep their size, every other dimension becomes 1, so parameters broadcast against the tensor.

Examples for an activation of shape (B, N, C) = (32, 197, 384):
    PerTensor()        -> (1, 1, 1)
    PerChannel(-1)     -> (1, 1, 384)     per input channel (RepQ-ViT's LayerNorm-output quantizer)
    PerToken()         -> (1, 197, 1)     per token (APHQ's token-wise 2-bit option)
For a weight (out, in): PerChannel(0) -> (out, 1) (per output row).
For attention operands (B, H, N, d): PerHead() -> (1, H, 1, 1).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Granularity", "PerTensor", "PerAxis", "PerChannel", "PerHead", "PerToken"]


@dataclass(frozen=True)
class Granularity:
    """Base class: `axes` are the kept dimensions (negative indices allowed)."""

    axes: tuple[int, ...] = ()

    def kept(self, ndim: int) -> tuple[int, ...]:
        """Kept dimensions as non-negative indices for a tensor of `ndim` dimensions."""
        out = []
        for a in self.axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"{type(self).__name__} keeps axis {a}, but the tensor has only {ndim} dims")
            out.append(a % ndim)
        return tuple(sorted(set(out)))

    def param_shape(self, shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """Shape of scale / zero-point tensors for a tensor of `shape`."""
        kept = self.kept(len(shape))
        return tuple(s if i in kept else 1 for i, s in enumerate(shape))

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dimensions that statistics are reduced over."""
        kept = self.kept(ndim)
        return tuple(i for i in range(ndim) if i not in kept)


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    axes: tuple[int, ...] = ()


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale per index along each dimension in `axes`."""


@dataclass(frozen=True, init=False)
class PerChannel(Granularity):
    """One scale per index of one axis: 0 = weight rows, -1 = activation channels."""

    def __init__(self, axis: int = 0):
        object.__setattr__(self, "axes", (axis,))


@dataclass(frozen=True, init=False)
class PerHead(Granularity):
    """One scale per attention head of a (B, H, N, d) operand."""

    def __init__(self):
        object.__setattr__(self, "axes", (1,))


@dataclass(frozen=True, init=False)
class PerToken(Granularity):
    """One scale per token (dimension -2) of a (..., N, C) activation."""

    def __init__(self):
        object.__setattr__(self, "axes", (-2,))
