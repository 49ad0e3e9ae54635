"""Quantizer specs: what an exporter needs to know about one quantizer, and integer weight codes.

A :class:`QuantSpec` is the plain description of an *active* quantizer (kind, bits, signedness,
zero-point rounding, granularity) plus its parameter tensors. It is what the packed checkpoint's
manifest records and what the ONNX writer turns into QuantizeLinear / DequantizeLinear nodes.

Kinds:
    uniform       common.quant.UniformQuantizer (asymmetric [0, 2^b-1] or symmetric [-2^(b-1), 2^(b-1)-1])
    log           common.quant.LogQuantizer (base 2 or sqrt2, post-softmax)
    dual_uniform  ERQ's DualUniformQuantizer (two per-row grids, an outlier-column mask), recognised by its
                  buffers; rebuilt as :class:`GridWeightQuantizer` (the same arithmetic, no method import)

Integer codes of a weight are unsigned: q = clamp(round(w/s) + z, 0, 2^b-1) (asymmetric) or
q = clamp(round(w/s), -2^(b-1), 2^(b-1)-1) + 2^(b-1) (symmetric, stored with an offset). Dequantizing
them with :func:`dequantize_codes` reproduces the quantizer's fake-quant weight bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.quant.granularity import Granularity, PerAxis, PerChannel, PerHead, PerTensor, PerToken
from common.quant.modules import IdentityQuantizer
from common.quant.primitives import fake_quant_affine
from common.quant.quantizers import LogQuantizer, Quantizer, UniformQuantizer

__all__ = ["QuantSpec", "spec_of", "build_quantizer", "weight_codes", "dequantize_codes", "granularity_to_dict",
           "granularity_from_dict", "UnsupportedQuantizer", "GridWeightQuantizer"]

_DUAL_BUFFERS = ("outlier", "scale1", "zero_point1", "scale2", "zero_point2")


class UnsupportedQuantizer(UserError):
    """A quantizer the chosen export format cannot represent."""


def granularity_to_dict(g: Granularity) -> dict[str, Any]:
    return {"type": type(g).__name__, "axes": list(g.axes)}


def granularity_from_dict(d: dict[str, Any]) -> Granularity:
    kind, axes = d["type"], tuple(d.get("axes", ()))
    if kind == "PerTensor":
        return PerTensor()
    if kind == "PerChannel":
        return PerChannel(axes[0])
    if kind == "PerHead":
        return PerHead()
    if kind == "PerToken":
        return PerToken()
    return PerAxis(axes)


class GridWeightQuantizer(Quantizer):
    """Per-row asymmetric weight grid with a second grid on a set of input columns (ERQ's dual-uniform
    weights, rebuilt without importing the method): x̂ = fake_quant_affine(w, S, Z) with
    S = where(outlier, scale1, scale2), Z likewise, zero-points used as stored."""

    def __init__(self, bits: int, out_features: int, in_features: int):
        super().__init__(bits, role="weight")
        self.register_buffer("outlier", torch.zeros(in_features, dtype=torch.bool))
        for name in _DUAL_BUFFERS[1:]:
            self.register_buffer(name, torch.zeros(out_features, 1))

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        m = self.outlier[None, :]
        return fake_quant_affine(w, torch.where(m, self.scale1, self.scale2),
                                 torch.where(m, self.zero_point1, self.zero_point2), self.bits, round_zero_point=False)


def _is_dual(q: nn.Module) -> bool:
    return q.__class__.__name__ in ("DualUniformQuantizer", "GridWeightQuantizer") and \
        all(isinstance(getattr(q, b, None), torch.Tensor) for b in _DUAL_BUFFERS)


@dataclass
class QuantSpec:
    """An active quantizer in plain terms (see the module docstring)."""

    kind: str
    role: str
    bits: int
    symmetric: bool = False
    round_zero_point: bool = True
    granularity: dict[str, Any] = field(default_factory=lambda: {"type": "PerTensor", "axes": []})
    base: str | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived values
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def uniform_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero-point as used in the forward pass) of a uniform quantizer; zero for symmetric ones."""
        s = self.tensors["scale"]
        if self.symmetric:
            return s, torch.zeros_like(s)
        z = self.tensors["zero_point"]
        return s, (torch.round(z) if self.round_zero_point else z)

    def integer_zero_point(self) -> bool:
        """Whether the zero-point used in the forward pass is an integer (so a QDQ pair is exact)."""
        if self.kind == "dual_uniform":
            return all(bool(torch.equal(self.tensors[k], self.tensors[k].round())) for k in ("zero_point1", "zero_point2"))
        if self.kind != "uniform":
            return False
        _, z = self.uniform_params()
        return bool(torch.equal(z, z.round()))

    def meta(self) -> dict[str, Any]:
        """The JSON-able part (tensors are stored next to it)."""
        return {"kind": self.kind, "role": self.role, "bits": self.bits, "symmetric": self.symmetric,
                "round_zero_point": self.round_zero_point, "granularity": self.granularity, "base": self.base,
                "tensors": {k: list(v.shape) for k, v in self.tensors.items()}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "QuantSpec":
        return cls(kind=meta["kind"], role=meta["role"], bits=int(meta["bits"]), symmetric=bool(meta["symmetric"]),
                   round_zero_point=bool(meta["round_zero_point"]), granularity=dict(meta["granularity"]),
                   base=meta.get("base"), tensors=tensors)


def spec_of(name: str, q: nn.Module | None) -> QuantSpec | None:
    """The spec of quantizer `q` (qualified name `name`), or None when it is the identity
    (missing, IdentityQuantizer, disabled, uncalibrated or 32-bit)."""
    if q is None or isinstance(q, IdentityQuantizer) or not isinstance(q, Quantizer) or not q.active:
        return None
    if isinstance(q, UniformQuantizer):
        t = {"scale": q.scale.detach().float().cpu().clone()}
        if not q.symmetric:
            t["zero_point"] = q.zero_point.detach().float().cpu().clone().expand_as(t["scale"]).contiguous()
        return QuantSpec("uniform", q.role, q.bits, q.symmetric, q.round_zero_point,
                         granularity_to_dict(q.granularity), tensors=t)
    if isinstance(q, LogQuantizer):
        return QuantSpec("log", q.role, q.bits, round_zero_point=False, granularity=granularity_to_dict(PerTensor()),
                         base=q.base, tensors={"scale": q.scale.detach().float().cpu().reshape(1).clone()})
    if _is_dual(q):
        t = {k: getattr(q, k).detach().cpu().clone() for k in ("scale1", "zero_point1", "scale2", "zero_point2")}
        t["outlier"] = q.outlier.detach().cpu().clone()
        return QuantSpec("dual_uniform", q.role, q.bits, round_zero_point=False,
                         granularity=granularity_to_dict(PerChannel(0)), tensors=t)
    raise UnsupportedQuantizer(f"quantizer {name} is a {type(q).__name__}, which has no export form (export "
                               "handles UniformQuantizer, LogQuantizer and dual-uniform weights)")


def build_quantizer(spec: QuantSpec) -> nn.Module:
    """A calibrated quantizer module computing what the one `spec` was taken from computes."""
    if spec.kind == "uniform":
        q = UniformQuantizer(spec.bits, symmetric=spec.symmetric, granularity=granularity_from_dict(spec.granularity),
                             round_zero_point=spec.round_zero_point, role=spec.role)
        q.set_qparams(spec.tensors["scale"], spec.tensors.get("zero_point"))
        return q
    if spec.kind == "log":
        q = LogQuantizer(spec.bits, base=spec.base or "sqrt2")
        q.set_qparams(spec.tensors["scale"])
        return q
    if spec.kind == "dual_uniform":
        q = GridWeightQuantizer(spec.bits, spec.tensors["scale1"].shape[0], spec.tensors["outlier"].numel())
        with torch.no_grad():
            for k, v in spec.tensors.items():
                getattr(q, k).copy_(v)
            q.calibrated.fill_(True)
        return q
    raise ValueError(f"unknown quantizer kind {spec.kind!r}")


def _grid(spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Full scale / zero-point (as used) of a weight quantizer, broadcastable against the weight."""
    if spec.kind == "dual_uniform":
        m = spec.tensors["outlier"][None, :]
        return (torch.where(m, spec.tensors["scale1"], spec.tensors["scale2"]),
                torch.where(m, spec.tensors["zero_point1"], spec.tensors["zero_point2"]))
    return spec.uniform_params()


def weight_codes(name: str, spec: QuantSpec, weight: torch.Tensor) -> torch.Tensor:
    """Unsigned integer codes (int64) of `weight` under `spec`; raises UnsupportedQuantizer if they are not integers."""
    if spec.kind not in ("uniform", "dual_uniform"):
        raise UnsupportedQuantizer(f"weight quantizer {name} is a {spec.kind} quantizer; weights must be uniform")
    w = weight.detach().float().cpu()
    s, z = _grid(spec)
    if spec.kind == "dual_uniform":
        s, z = s.reshape(w.shape[0], -1), z.reshape(w.shape[0], -1)
    if spec.symmetric:
        q = torch.clamp(torch.round(w / s), spec.qmin, spec.qmax) - spec.qmin
    else:
        q = torch.clamp(torch.round(w / s) + z, 0, spec.qmax)
    if not bool(torch.equal(q, q.round())):
        raise UnsupportedQuantizer(f"weight quantizer {name} has a fractional zero-point, so its codes are not "
                                   "integers; it cannot be exported as integer weights")
    return q.to(torch.int64)


def dequantize_codes(spec: QuantSpec, codes: torch.Tensor) -> torch.Tensor:
    """The fake-quant weight (float32) from unsigned codes: (q - z)·s, or (q - 2^(b-1))·s for symmetric grids."""
    q = codes.to(torch.float32)
    s, z = _grid(spec)
    if spec.kind == "dual_uniform":
        s, z = s.reshape(q.shape[0], -1), z.reshape(q.shape[0], -1)
    if spec.symmetric:
        return (q + spec.qmin) * s
    return (q - z) * s
