"""ONNX export of a fake-quant model with QuantizeLinear / DequantizeLinear (QDQ) at every quantizer.

How: the model is copied into an *export form* in which every active quantizer is a marker, a custom op
``vitq::qmark(x, qname)`` that is the identity in PyTorch and translates to one ``vitq.QMark`` node
(linear layers compute ``x @ Wᵀ`` from a stored ``Wᵀ`` so the weight marker reads an initializer directly).
``torch.onnx.export(dynamo=True)`` writes the FP graph with the markers; each marker is then replaced,
with onnx's helpers, by the quantizer's exact ONNX form:

* activations, uniform, integer zero-point, per tensor or along one axis (per channel / head / token):
  ``QuantizeLinear → [Clip] → DequantizeLinear`` in the narrowest ONNX integer type that holds the codes and
  the zero-point: uint4/int4 at 4 bits (opset 21), uint8/int8 up to 8, uint16/int16 at 16; a Clip on the codes
  to [0, 2^b-1] (or the signed range) where the bit-width has no ONNX type (2, 3, 5-7 bits), so saturation is
  exact. Per-axis pairs dequantize with unit scales and multiply by the scales after (exact, and it keeps
  onnxruntime 1.32 from fusing them into a MatMulIntegerToFloat that rejects per-axis activations);
* weights: the integer codes as an initializer of the narrowest type holding codes and zero-points (uint4 for
  ≤4-bit grids whose zero-points lie in [0, 15], else 8-bit) → ``DequantizeLinear`` (axis = the output
  channel); ERQ's dual-uniform weights: two DequantizeLinear of the same codes and a ``Where`` on the
  outlier-column mask;
* quantizers without a QDQ form are *emulated* with plain ONNX ops computing the same arithmetic:
  uniform quantizers with a fractional zero-point (RepQ-ViT / ERQ after LayerNorm reparameterization), with
  scales along two axes (APHQ's token-wise matmul operands) or a zero-point range no type holds: Div, Round,
  Add, Clip, Sub, Mul (bit-exact); the log2 / log√2 post-softmax quantizer (RepQ-ViT, ERQ): Div, Log, Round,
  Clip, Pow, Where (ONNX has no log2: ln(x)/ln 2 can flip a level where -2·log2(x/s) is within an ulp of a
  rounding boundary). ``OnnxOptions.qdq_only`` refuses them instead (one-line UserError naming the quantizer
  and the option).

What onnxruntime 1.32 (CPU, default graph optimizations) makes of it: a per-tensor quantized activation and an
8-bit weight feeding a MatMul fuse into MatMulIntegerToFloat (integer GEMM); a 4-bit weight behind a QDQ
activation (W4A4, W4A8) stays a float MatMul over dequantized weights; a uint4/uint8 weight behind a *float*
activation (weight-only, or an activation quantizer written in emulated / per-axis form) fuses into
MatMulNBits, whose default accuracy level 4 re-quantizes that activation to int8 per block of 32, an
approximation of onnxruntime's own (session entry ``session.qdq_matmulnbits_accuracy_level=0`` keeps fp32
activations and the exact values; ``common.export.runtime`` and the CLI's verification report both).
``OnnxOptions.int8_weights`` stores every sub-8-bit weight in 8-bit types so that W4A8 runs on the 8-bit
integer GEMM.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.quant.modules import QuantConv2d, QuantLinear
from common.quant.quantizers import quantizers_of

from .specs import QuantSpec, UnsupportedQuantizer, spec_of, weight_codes

__all__ = ["OnnxOptions", "export_onnx", "quantizer_specs", "onnx_form"]

_DOMAIN = "vitq"


# --------------------------------------------------------------------------- the marker op

@torch.library.custom_op("vitq::qmark", mutates_args=())
def qmark(x: torch.Tensor, qname: str) -> torch.Tensor:
    """Identity marker of the quantizer `qname` (replaced by its QDQ form after export)."""
    return x.clone()


@qmark.register_fake
def _qmark_fake(x: torch.Tensor, qname: str) -> torch.Tensor:
    return torch.empty_like(x)


def _marker_translation():
    """onnxscript translation of the marker to a `vitq.QMark` node (its schema registered with onnx once)."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has("QMark", _DOMAIN):
        onnx.defs.register_schema(OpSchema(
            "QMark", _DOMAIN, 1, inputs=[OpSchema.FormalParameter("x", "T")],
            outputs=[OpSchema.FormalParameter("y", "T")], type_constraints=[("T", ["tensor(float)"], "float")],
            attributes=[OpSchema.Attribute("qname", OpSchema.AttrType.STRING, "quantizer name")]))
    opset = onnxscript.values.Opset(_DOMAIN, 1)

    def translate(x, qname: str):
        return opset.QMark(x, qname=qname)

    return translate


class _Mark(nn.Module):
    def __init__(self, qname: str):
        super().__init__()
        self.qname = qname
        self.rank: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rank = x.dim()
        return qmark(x, self.qname)


class _ExportLinear(nn.Module):
    """x @ Wᵀ + b with Wᵀ stored (the weight marker then reads an initializer, MatMul consumes it)."""

    def __init__(self, layer: QuantLinear, act: nn.Module, weight: nn.Module):
        super().__init__()
        self.input_quantizer, self.weight_mark = act, weight
        self.weight_t = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.input_quantizer(x), self.weight_mark(self.weight_t))
        return y if self.bias is None else y + self.bias


class _ExportConv(nn.Module):
    def __init__(self, layer: QuantConv2d, act: nn.Module, weight: nn.Module):
        super().__init__()
        if layer.padding_mode != "zeros":
            raise UserError(f"conv {layer.qname} uses padding_mode={layer.padding_mode}; only zeros is exported")
        self.input_quantizer, self.weight_mark = act, weight
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quantizer(x), self.weight_mark(self.weight), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


# --------------------------------------------------------------------------- options and checks

@dataclass
class OnnxOptions:
    """ONNX export settings (see the module docstring)."""

    opset: int = 21
    qdq_only: bool = False
    int8_weights: bool = False
    dynamic_batch: bool = True

    def __post_init__(self):
        if self.opset < 21:
            raise UserError(f"opset {self.opset}: the int4/uint4 QDQ types need opset 21 or later")


def quantizer_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """Specs of every active quantizer (UnsupportedQuantizer for a family with no export form)."""
    out = {}
    for name, q in quantizers_of(model):
        spec = spec_of(name, q)
        if spec is not None:
            out[name] = spec
    return out


def _single_axis(spec: QuantSpec) -> int | None | bool:
    """The one kept axis of a uniform quantizer's scale (None: per tensor; False: two or more axes)."""
    shape = spec.tensors["scale"].shape
    kept = [i for i, n in enumerate(shape) if n > 1]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else False


def onnx_form(spec: QuantSpec) -> str:
    """How a quantizer is written: "qdq", "dq" (weights), "dual" (dual-uniform weights) or "emulated" (plain ops)."""
    if spec.kind == "dual_uniform":
        return "dual"
    if spec.role == "weight":
        return "dq"
    if _single_axis(spec) is not False and act_container(spec) is not None:
        return "qdq"
    return "emulated"


def _emulation_reason(spec: QuantSpec) -> str:
    if spec.kind == "log":
        return f"a log{'√2' if spec.base == 'sqrt2' else '2'} quantizer (no QDQ form)"
    if not spec.integer_zero_point():
        return "a uniform quantizer with a fractional zero-point (QuantizeLinear needs an integer one)"
    if _single_axis(spec) is not False:
        return f"a {spec.bits}-bit quantizer whose zero-point range fits no ONNX integer type"
    return f"a uniform quantizer with scales along several axes (shape {tuple(spec.tensors['scale'].shape)})"


def check_exportable(specs: dict[str, QuantSpec], options: OnnxOptions) -> None:
    """Raise UserError for quantizers the options rule out (before any export work)."""
    for name, spec in specs.items():
        if spec.role == "weight" and spec.kind == "uniform" and not spec.integer_zero_point():
            raise UnsupportedQuantizer(f"weight quantizer {name} has a fractional zero-point; integer weights "
                                       "need an integer one")
        if spec.role == "weight" and spec.kind == "log":
            raise UnsupportedQuantizer(f"weight quantizer {name} is a log quantizer; weights must be uniform")
        if options.qdq_only and onnx_form(spec) == "emulated":
            raise UnsupportedQuantizer(f"{name} is {_emulation_reason(spec)}: it has no QuantizeLinear/DequantizeLinear "
                                       "form; drop --qdq-only to export it as plain ONNX ops")


def _export_copy(model: nn.Module, specs: dict[str, QuantSpec]) -> tuple[nn.Module, dict[str, _Mark]]:
    """The model with every active quantizer a marker and inactive ones the identity."""
    m = copy.deepcopy(model).cpu().eval()
    marks: dict[str, _Mark] = {}

    def quantizer(name: str) -> nn.Module:
        if name in specs:
            marks[name] = _Mark(name)
            return marks[name]
        return nn.Identity()

    for name, _ in list(quantizers_of(m)):
        parent, _, leaf = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, leaf, quantizer(name))
    for name, layer in list(m.named_modules()):
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            parent, _, leaf = name.rpartition(".")
            owner = m.get_submodule(parent) if parent else m
            cls = _ExportLinear if isinstance(layer, QuantLinear) else _ExportConv
            setattr(owner, leaf, cls(layer, layer.input_quantizer, layer.weight_quantizer))
    return m, marks


# --------------------------------------------------------------------------- marker → QDQ

def _ranges():
    from onnx import TensorProto as T

    return [(T.UINT4, 0, 15), (T.INT4, -8, 7), (T.UINT8, 0, 255), (T.INT8, -128, 127), (T.UINT16, 0, 65535),
            (T.INT16, -32768, 32767)]


def _needed(spec: QuantSpec, zero_points: list[torch.Tensor]) -> tuple[int, int]:
    """Integer range a container must hold: the codes and every zero-point."""
    lo, hi = spec.qmin, spec.qmax
    for z in zero_points:
        lo, hi = min(lo, int(z.min())), max(hi, int(z.max()))
    return lo, hi


def act_container(spec: QuantSpec) -> tuple[int, bool] | None:
    """(ONNX integer type, whether a Clip to the code range is needed) for an activation QDQ pair, or None.

    The zero-point must fit the type. A type wider than the code range needs a Clip on the codes, and
    onnxruntime has Clip for 8-bit types only, so 4- and 16-bit types are used only when they match the code
    range exactly (2/3-bit codes use 8-bit types + Clip; what fits nothing is emulated)."""
    if spec.kind != "uniform" or not spec.integer_zero_point():
        return None
    lo, hi = _needed(spec, [spec.uniform_params()[1]])
    for dtype, tlo, thi in _ranges():
        exact = (spec.qmin, spec.qmax) == (tlo, thi)
        if tlo <= lo and hi <= thi and (exact or thi - tlo == 255):
            return dtype, not exact
    return None


def weight_container(spec: QuantSpec, int8_weights: bool = False) -> int:
    """ONNX integer type of a weight's codes: the narrowest holding the codes and zero-points (4-bit types
    skipped with `int8_weights`)."""
    zps = [spec.tensors[k] for k in ("zero_point1", "zero_point2")] if spec.kind == "dual_uniform" else \
        [spec.uniform_params()[1]]
    lo, hi = _needed(spec, zps)
    for dtype, tlo, thi in _ranges():
        if int8_weights and thi - tlo < 255:
            continue
        if tlo <= lo and hi <= thi:
            return dtype
    raise UnsupportedQuantizer(f"weight codes of {spec.bits} bits with zero-points in [{lo}, {hi}] fit no ONNX type")


class _Graph:
    """Small helper around the ONNX graph: unique names, initializers, nodes."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.taken = set(self.inits) | {o for n in self.graph.node for o in n.output} | \
            {i.name for i in self.graph.input}

    def name(self, base: str) -> str:
        base = base.replace("/", ".")
        out, i = base, 0
        while out in self.taken:
            i += 1
            out = f"{base}_{i}"
        self.taken.add(out)
        return out

    def const(self, base: str, array: np.ndarray, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        name = self.name(base)
        arr = np.asarray(array)
        if dtype is not None:
            arr = arr.astype(helper.tensor_dtype_to_np_dtype(dtype))
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _act_nodes(g: _Graph, qname: str, spec: QuantSpec, x: str, y: str, rank: int, options: OnnxOptions) -> list:
    from onnx import helper

    form = onnx_form(spec)
    if form == "emulated":
        return _emulated_nodes(g, qname, spec, x, y)
    s, z = spec.uniform_params()
    axis = _single_axis(spec)
    dtype, clip = act_container(spec)
    if axis is None:
        s_arr, z_arr, attrs = _np(s).reshape(()), _np(z).reshape(()), {}
    else:
        axis = axis + rank - s.dim()  # scales broadcast from the right
        s_arr, z_arr, attrs = _np(s).reshape(-1), _np(z).reshape(-1), {"axis": axis}
    sn = g.const(f"{qname}.scale", s_arr.astype(np.float32))
    zn = g.const(f"{qname}.zero_point", z_arr, dtype)
    q = g.name(f"{qname}.codes")
    nodes = [helper.make_node("QuantizeLinear", [x, sn, zn], [q], name=g.name(f"{qname}/QuantizeLinear"), **attrs)]
    if clip:
        lo = g.const(f"{qname}.qmin", np.array(spec.qmin), dtype)
        hi = g.const(f"{qname}.qmax", np.array(spec.qmax), dtype)
        clipped = g.name(f"{qname}.codes_clipped")
        nodes.append(helper.make_node("Clip", [q, lo, hi], [clipped], name=g.name(f"{qname}/Clip")))
        q = clipped
    if axis is None:
        nodes.append(helper.make_node("DequantizeLinear", [q, sn, zn], [y], name=g.name(f"{qname}/DequantizeLinear")))
        return nodes
    # per-axis: DequantizeLinear with unit scales, then Mul by the scales (exact: (q - z)·1 is an integer).
    # onnxruntime 1.32 fuses a per-axis activation QDQ pair feeding a MatMul into MatMulIntegerToFloat, which
    # then rejects the per-axis zero-point at run time; the Mul keeps the pair out of that fusion.
    ones = g.const(f"{qname}.unit_scale", np.ones_like(s_arr, dtype=np.float32))
    integers = g.name(f"{qname}.centered")
    nodes.append(helper.make_node("DequantizeLinear", [q, ones, zn], [integers], name=g.name(f"{qname}/DequantizeLinear"),
                                  **attrs))
    s_b = g.const(f"{qname}.scale_broadcast", _np(s).astype(np.float32))
    nodes.append(helper.make_node("Mul", [integers, s_b], [y], name=g.name(f"{qname}/Mul")))
    return nodes


def _emulated_nodes(g: _Graph, qname: str, spec: QuantSpec, x: str, y: str) -> list:
    """Plain-op form of a quantizer, the same arithmetic as common.quant.primitives."""
    from onnx import helper

    def f32(base, v):
        return g.const(f"{qname}.{base}", np.asarray(v, dtype=np.float32))

    def node(op, inputs, base, **attrs):
        out = g.name(f"{qname}.{base}")
        nodes.append(helper.make_node(op, inputs, [out], name=g.name(f"{qname}/{op}"), **attrs))
        return out

    nodes: list = []
    if spec.kind == "uniform":
        s, z = spec.uniform_params()
        sn = f32("scale", _np(s))
        r = node("Round", [node("Div", [x, sn], "div")], "round")
        if spec.symmetric:
            c = node("Clip", [r, f32("qmin", spec.qmin), f32("qmax", spec.qmax)], "clip")
            nodes.append(helper.make_node("Mul", [c, sn], [y], name=g.name(f"{qname}/Mul")))
        else:
            zn = f32("zero_point", _np(z))
            c = node("Clip", [node("Add", [r, zn], "add"), f32("qmin", 0.0), f32("qmax", spec.qmax)], "clip")
            nodes.append(helper.make_node("Mul", [node("Sub", [c, zn], "sub"), sn], [y], name=g.name(f"{qname}/Mul")))
        return nodes
    if spec.kind == "log":  # level = round(-k·log2(x/s)); x̂ = 0 if level ≥ 2^b else s·2^(-clamp(level)/k)
        k = 2.0 if spec.base == "sqrt2" else 1.0
        sn = f32("scale", _np(spec.tensors["scale"]).reshape(()))
        log2 = node("Div", [node("Log", [node("Div", [x, sn], "div")], "log"), f32("ln2", math.log(2.0))], "log2")
        level = node("Round", [node("Mul", [log2, f32("neg_k", -k)], "neg_k_log2")], "level")
        q = node("Clip", [level, f32("qmin", 0.0), f32("qmax", 2.0 ** spec.bits - 1)], "clip")
        pw = node("Pow", [f32("two", 2.0), node("Mul", [q, f32("neg_inv_k", -1.0 / k)], "exponent")], "pow")
        val = node("Mul", [sn, pw], "value")
        under = node("GreaterOrEqual", [level, f32("n_levels", 2.0 ** spec.bits)], "underflow")
        nodes.append(helper.make_node("Where", [under, f32("zero", 0.0), val], [y], name=g.name(f"{qname}/Where")))
        return nodes
    raise UnsupportedQuantizer(f"{qname}: no ONNX form for a {spec.kind} activation quantizer")


def _weight_nodes(g: _Graph, qname: str, spec: QuantSpec, layer: nn.Module, init_name: str, y: str,
                  options: OnnxOptions) -> list:
    """Integer codes initializer(s) → DequantizeLinear for the weight marker reading `init_name`."""
    from onnx import helper, numpy_helper

    w = layer.weight.detach().float().cpu()
    codes = weight_codes(qname, spec, w)  # unsigned, (out, in[, kh, kw])
    exported = numpy_helper.to_array(g.inits[init_name])
    linear = isinstance(layer, QuantLinear)
    ref = w.t().numpy() if linear else w.numpy()
    if exported.shape != ref.shape or not np.array_equal(exported, ref):
        raise RuntimeError(f"ONNX initializer {init_name} is not the weight of {qname}; export layout changed")
    signed = spec.symmetric
    dtype = weight_container(spec, options.int8_weights)
    stored = (codes + spec.qmin) if signed else codes  # signed codes for symmetric grids
    layout = stored.t() if linear else stored  # linear: (in, out), per output channel = axis 1
    out_axis = 1 if linear else 0
    name_c = g.const(f"{qname}.codes", _np(layout), dtype)

    def scale_zp(s: torch.Tensor, z: torch.Tensor, suffix: str) -> tuple[str, str, dict]:
        per_row = s.numel() > 1
        if not per_row:
            return (g.const(f"{qname}.scale{suffix}", _np(s).reshape(()).astype(np.float32)),
                    g.const(f"{qname}.zero_point{suffix}", _np(z).reshape(()), dtype), {})
        s1, z1 = _np(s).reshape(-1).astype(np.float32), _np(z).reshape(-1)
        return (g.const(f"{qname}.scale{suffix}", s1), g.const(f"{qname}.zero_point{suffix}", z1, dtype),
                {"axis": out_axis})

    if spec.kind == "dual_uniform":
        t, nodes, outs = spec.tensors, [], []
        for i in ("1", "2"):
            sn, zn, attrs = scale_zp(t[f"scale{i}"], t[f"zero_point{i}"], i)
            outs.append(g.name(f"{qname}.dequantized{i}"))
            nodes.append(helper.make_node("DequantizeLinear", [name_c, sn, zn], [outs[-1]],
                                          name=g.name(f"{qname}/DequantizeLinear{i}"), **attrs))
        mask = g.const(f"{qname}.outlier", _np(t["outlier"]).reshape(-1, 1).astype(bool))  # (in, 1) rows of Wᵀ
        nodes.append(helper.make_node("Where", [mask, outs[0], outs[1]], [y], name=g.name(f"{qname}/Where")))
        return nodes
    s, z = spec.uniform_params()
    sn, zn, attrs = scale_zp(s, torch.zeros_like(s) if signed else z, "")
    return [helper.make_node("DequantizeLinear", [name_c, sn, zn], [y], name=g.name(f"{qname}/DequantizeLinear"),
                             **attrs)]


def _replace_markers(proto, model: nn.Module, specs: dict[str, QuantSpec], marks: dict[str, _Mark],
                     options: OnnxOptions) -> dict[str, int]:
    from onnx import helper

    g = _Graph(proto)
    layers = {f"{n}.weight_quantizer": m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    forms: dict[str, int] = {}
    new = []
    seen = set()
    for node in proto.graph.node:
        if node.domain != _DOMAIN:
            new.append(node)
            continue
        qname = helper.get_attribute_value(node.attribute[0]).decode()
        spec = specs[qname]
        seen.add(qname)
        x, y = node.input[0], node.output[0]
        if spec.role == "weight":
            if x not in g.inits:
                raise RuntimeError(f"the weight marker of {qname} does not read an initializer")
            new += _weight_nodes(g, qname, spec, layers[qname], x, y, options)
        else:
            rank = marks[qname].rank
            if rank is None:
                raise RuntimeError(f"quantizer {qname} was not reached by the example forward")
            new += _act_nodes(g, qname, spec, x, y, rank, options)
        form = onnx_form(spec)
        forms[form] = forms.get(form, 0) + 1
    missing = set(specs) - seen
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers lost in export (first: {sorted(missing)[0]})")
    del proto.graph.node[:]
    proto.graph.node.extend(new)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for imp in list(proto.opset_import):
        if imp.domain == _DOMAIN:
            proto.opset_import.remove(imp)
    names = used | {o for n in proto.graph.node for o in n.output}
    infos = [v for v in proto.graph.value_info if v.name in names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(infos)
    for n in proto.graph.node:  # the exporter's per-node stack traces and source names: most of a small file
        del n.metadata_props[:]
    for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del v.metadata_props[:]
    return forms


# --------------------------------------------------------------------------- entry point

def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, options: OnnxOptions | None = None,
                specs: dict[str, QuantSpec] | None = None) -> dict[str, Any]:
    """Write `model` (a wrapped fake-quant model, or any model without active quantizers) to `path` as ONNX.

    `example`: an input batch (batch size ≥ 2 for a dynamic batch dimension). Returns a report with the
    quantizer forms written and the file size.
    """
    import onnx

    options = options or OnnxOptions()
    specs = quantizer_specs(model) if specs is None else specs
    check_exportable(specs, options)
    export_model, marks = _export_copy(model, specs)
    with torch.no_grad():
        export_model(example)  # records each marker's input rank
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if options.dynamic_batch else None
    program = torch.onnx.export(export_model, (example,), dynamo=True, opset_version=options.opset,
                                custom_translation_table={torch.ops.vitq.qmark.default: _marker_translation()},
                                input_names=["input"], output_names=["logits"], dynamic_shapes=dynamic,
                                optimize=True, verbose=False, report=False)
    proto = program.model_proto
    forms = _replace_markers(proto, model, specs, marks, options)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return {"path": str(path), "bytes": path.stat().st_size, "opset": options.opset, "int8_weights": options.int8_weights,
            "quantizer_forms": forms, "nodes": len(proto.graph.node)}
