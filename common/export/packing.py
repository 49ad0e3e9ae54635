"""Bit packing of integer codes: b-bit codes as a little-endian bit stream in uint8 bytes.

Code i occupies bits [i·b, (i+1)·b) of the stream, least significant bit first, so at 4 bits two codes
share a byte (the first in the low nibble), at 2 bits four, and 3-bit codes straddle bytes (eight codes
in three bytes). Codes above 8 bits are stored unpacked as little-endian uint16.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes"]


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits occupy once packed."""
    return numel * 2 if bits > 8 else math.ceil(numel * bits / 8)


def _check(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"can pack codes of 1..16 bits, not {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (any shape, any integer or integral float dtype) into a flat uint8 tensor.

    Raises ValueError if a code is negative, not an integer or does not fit in `bits` bits.
    """
    _check(bits)
    flat = codes.detach().reshape(-1).cpu()
    if flat.is_floating_point():
        if not bool(torch.equal(flat, flat.round())):
            raise ValueError("codes must be integers")
    arr = flat.to(torch.int64).numpy()
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits, got [{arr.min()}, {arr.max()}]")
    if bits > 8:
        return torch.from_numpy(arr.astype("<u2").view(np.uint8).copy())
    if bits == 8:
        return torch.from_numpy(arr.astype(np.uint8))
    # (n, 8) little-endian bits of every code, keep the low `bits`, stream them into bytes
    stream = np.unpackbits(arr.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the codes as an int64 tensor of `shape`."""
    _check(bits)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    raw = packed.detach().reshape(-1).cpu().to(torch.uint8).numpy()
    if raw.size != packed_nbytes(numel, bits):
        raise ValueError(f"{raw.size} packed bytes do not hold {numel} codes of {bits} bits "
                         f"(expected {packed_nbytes(numel, bits)})")
    if bits > 8:
        arr = raw.view("<u2").astype(np.int64)
    elif bits == 8:
        arr = raw.astype(np.int64)
    else:
        stream = np.unpackbits(raw, bitorder="little")[:numel * bits].reshape(numel, bits)
        arr = (stream.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)
    return torch.from_numpy(arr).reshape(shape)
