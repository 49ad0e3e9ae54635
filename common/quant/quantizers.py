"""Quantizer modules: stateful wrappers around the primitives.

Every quantizer has a `role` ("weight" or "act"), a bit-width, an `enabled` switch and a persistent
`calibrated` flag. It is the identity while disabled, uncalibrated or at 32 bits, so a wrapped model
with quantization off reproduces the FP model exactly. Methods set the parameters
(`set_qparams`) after their own search; the parameter shape follows the tensor's granularity.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .granularity import Granularity, PerTensor
from .primitives import check_bits, fake_quant_affine, fake_quant_log2, fake_quant_log_sqrt2, fake_quant_symmetric

__all__ = ["Quantizer", "UniformQuantizer", "LogQuantizer", "quantizers_of", "set_quant_state", "quant_state", "quantized_only",
           "calibration_pinned"]


class Quantizer(nn.Module):
    """Base class: identity unless enabled, calibrated and below 32 bits.

    Training protocol (block reconstruction uses only this, for every family): `scale_parameters()`
    lists the parameters it may learn (empty for families without learned scales); the knobs `ste`
    (straight-through rounding, the family's training form) and `drop_prob` (QDrop keep probability)
    are set on every active activation quantizer while its unit trains, then reset.
    """

    def __init__(self, bits: int, role: str = "act"):
        super().__init__()
        if role not in ("act", "weight"):
            raise ValueError(f"role must be 'act' or 'weight', got {role!r}")
        self.bits = check_bits(bits)
        self.role = role
        self.enabled = True
        self.ste = False
        self.drop_prob = 1.0
        self.register_buffer("calibrated", torch.tensor(False))

    #: a Python copy of `calibrated` while :func:`calibration_pinned` holds it (None: read the buffer).
    calibration_pin: bool | None = None

    @property
    def active(self) -> bool:
        if not (self.enabled and self.bits < 32):
            return False
        pin = self.calibration_pin
        return bool(self.calibrated) if pin is None else pin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x) if self.active else x

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_parameters(self) -> list[nn.Parameter]:
        """Parameters block reconstruction learns for this quantizer (its scales); none by default."""
        return []

    def _resize_to_state(self, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
        """Let a loaded checkpoint change parameter shapes (e.g. per-tensor -> per-token scales)."""
        for name in names:
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and state_dict[key].shape != cur.shape:
                new = torch.empty_like(state_dict[key], dtype=cur.dtype, device=cur.device)
                if isinstance(cur, nn.Parameter):
                    setattr(self, name, nn.Parameter(new, requires_grad=cur.requires_grad))
                else:
                    setattr(self, name, new)


class UniformQuantizer(Quantizer):
    """Uniform fake-quantizer, asymmetric (affine, [0, 2^b-1]) or symmetric, at a given granularity.

    Training knobs used by block reconstruction: `ste` (straight-through rounding so `scale` learns)
    and `drop_prob` (QDrop: each element keeps its quantized value with this probability in training).
    """

    def __init__(self, bits: int, symmetric: bool = False, granularity: Granularity = PerTensor(),
                 round_zero_point: bool = True, role: str = "act"):
        super().__init__(bits, role)
        self.symmetric = symmetric
        self.granularity = granularity
        self.round_zero_point = round_zero_point
        self.ste = False
        self.drop_prob = 1.0
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {kind}, {type(self.granularity).__name__}, role={self.role}"

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Install searched parameters and mark the quantizer calibrated."""
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if self.scale.shape == scale.shape:
            self.scale.data.copy_(scale.to(self.scale.device))
        else:
            self.scale = nn.Parameter(scale.to(self.scale.device), requires_grad=self.scale.requires_grad)
        zp = torch.zeros_like(scale) if zero_point is None else torch.as_tensor(zero_point, dtype=torch.float32)
        self.zero_point = zp.detach().clone().to(self.scale.device).expand_as(scale).clone()
        self.calibrated.fill_(True)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            y = fake_quant_symmetric(x, self.scale, self.bits, ste=self.ste)
        else:
            y = fake_quant_affine(x, self.scale, self.zero_point, self.bits, self.round_zero_point, ste=self.ste)
        if self.training and self.drop_prob < 1.0:
            y = torch.where(torch.rand_like(x) < self.drop_prob, y, x)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._resize_to_state(state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LogQuantizer(Quantizer):
    """Logarithmic fake-quantizer for post-softmax probabilities: base 2 or sqrt(2) (RepQ-ViT)."""

    def __init__(self, bits: int, base: str = "sqrt2"):
        super().__init__(bits, "act")
        if base not in ("2", "sqrt2"):
            raise ValueError(f"log quantizer base must be '2' or 'sqrt2', got {base!r}")
        self.base = base
        self.scale = nn.Parameter(torch.ones(1))

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}"

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        self.scale = nn.Parameter(torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(-1)[:1]
                                  .to(self.scale.device), requires_grad=self.scale.requires_grad)
        self.calibrated.fill_(True)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        fn = fake_quant_log_sqrt2 if self.base == "sqrt2" else fake_quant_log2
        return fn(x, self.scale, self.bits)


def quantizers_of(model: nn.Module, role: str | None = None) -> Iterator[tuple[str, Quantizer]]:
    """All quantizers of a model (optionally of one role) with their qualified names."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and (role is None or m.role == role):
            yield name, m


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Switch weight and/or activation quantization on or off (None = leave as is)."""
    for _, q in quantizers_of(model):
        flag = weight if q.role == "weight" else act
        if flag is not None:
            q.enabled = flag


@contextlib.contextmanager
def calibration_pinned(model: nn.Module) -> Iterator[nn.Module]:
    """Read each quantizer's `calibrated` buffer once and let `active` use that Python flag until exit.

    `bool(buffer)` per forward is a device sync on GPU and a graph break under torch.compile; block
    reconstruction pins the flags of the unit it trains (nothing calibrates it meanwhile)."""
    pinned = [q for _, q in quantizers_of(model)]
    for q in pinned:
        q.calibration_pin = bool(q.calibrated)
    try:
        yield model
    finally:
        for q in pinned:
            q.__dict__.pop("calibration_pin", None)


@contextlib.contextmanager
def _flags_restored(model: nn.Module):
    """Yields [(quantizer, enabled)] of `model`; every quantizer's flag is restored on exit."""
    saved = [(q, q.enabled) for _, q in quantizers_of(model)]
    try:
        yield saved
    finally:
        for q, flag in saved:
            q.enabled = flag


@contextlib.contextmanager
def quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None):
    """Temporarily switch quantization on or off; restores each quantizer's flag on exit."""
    with _flags_restored(model):
        set_quant_state(model, weight, act)
        yield model


@contextlib.contextmanager
def quantized_only(model: nn.Module, modules):
    """Quantizers of `modules` keep their switches, every other quantizer of `model` is off (restored after)."""
    keep = {id(q) for m in modules for _, q in quantizers_of(m)}
    with _flags_restored(model) as saved:
        for q, _ in saved:
            if id(q) not in keep:
                q.enabled = False
        yield model
