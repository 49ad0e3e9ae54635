"""The packed integer checkpoint: one safetensors file that rebuilds the quantized model on its own.

Contents (tensor keys follow the model's state dict):

* ``<layer>.weight.codes``  uint8: the weight's integer codes packed at their bit-width
  (:mod:`common.export.packing`); shape, bits and quantizer in the manifest;
* ``<quantizer>.<tensor>``  float32 (bool for a dual-uniform outlier mask): the parameters of every active
  quantizer, weight and activation (``scale``, ``zero_point``; ``scale1``/``zero_point1``/``scale2``/
  ``zero_point2``/``outlier`` for ERQ's dual-uniform weights), in their granularity's shape;
* every other state-dict tensor (LayerNorms, biases, embeddings, FP layers) in float32;
* metadata ``vitq_manifest``: JSON with the format version, the architecture (timm name + kwargs), method,
  bits, the run config, project / torch / timm versions, each quantizer's spec (kind, bits, signedness,
  zero-point rounding, granularity), the packed weights and structural changes (MLP activations swapped).

:func:`load_packed` builds the timm architecture, wraps it, installs the quantizers and dequantizes the
codes; its logits equal those of the model the file was written from, bit for bit.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import UserError
from common.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from common.quant.quantizers import Quantizer, quantizers_of
from common.quant.scheme import QuantScheme
from common.quant.wrap import QuantViTAttention, QuantWindowAttention, wrap_model

from .packing import pack_codes, unpack_codes
from .specs import QuantSpec, build_quantizer, dequantize_codes, spec_of, weight_codes

__all__ = ["FORMAT", "pack_model", "save_packed", "load_packed", "read_manifest", "build_architecture",
           "fp32_bytes", "project_versions"]

FORMAT = "vitq-packed"
VERSION = 1
_WRAPPED = (QuantLinear, QuantConv2d, QuantMatMul, QuantViTAttention, QuantWindowAttention)
_QUANT_LAYERS = (QuantLinear, QuantConv2d)


def project_versions() -> dict[str, str]:
    import importlib.metadata as md

    import timm

    try:
        vitq = md.version("vitq")
    except md.PackageNotFoundError:  # pragma: no cover - source checkout without install
        vitq = "unknown"
    return {"vitq": vitq, "torch": torch.__version__, "timm": timm.__version__}


def fp32_bytes(model: nn.Module) -> int:
    """Payload bytes of `model`'s floating-point state dict in float32 (the FP checkpoint's size)."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if torch.is_floating_point(t))


def build_architecture(info: dict[str, Any]) -> nn.Module:
    """The random-init timm model of a manifest's `model` entry (timm name, kwargs)."""
    import timm

    if info.get("register_module"):
        importlib.import_module(info["register_module"])
    if not timm.is_model(info["timm_name"]):
        raise UserError(f"timm does not know model {info['timm_name']!r} named in the checkpoint")
    return timm.create_model(info["timm_name"], pretrained=False, **dict(info.get("kwargs") or {})).float().eval()


def _module_swaps(model: nn.Module, reference: nn.Module) -> dict[str, str]:
    """Modules whose class differs from the plain architecture's (APHQ's GELU→ReLU), other than the wrapping."""
    ref = dict(reference.named_modules())
    swaps = {}
    for name, m in model.named_modules():
        r = ref.get(name)
        if r is None or isinstance(m, _WRAPPED) or isinstance(m, Quantizer) or type(m) is type(r):
            continue
        cls = type(m)
        if not cls.__module__.startswith("torch.nn") or any(True for _ in m.parameters(recurse=False)):
            raise UserError(f"module {name} is a {cls.__name__} where the architecture has a {type(r).__name__}; "
                            "only parameter-free torch.nn modules (e.g. ReLU) can be recorded as swaps")
        swaps[name] = f"{cls.__module__}.{cls.__qualname__}"
    return swaps


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, last = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, last, module)


def pack_model(model: nn.Module, reference: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest entries (quantizers, weights, swaps) of a wrapped fake-quant model.

    `reference`: the plain architecture, to record structural changes. Every packed weight is checked to
    dequantize to the quantizer's fake-quant weight exactly.
    """
    quantizer_names = {name for name, _ in quantizers_of(model)}
    specs: dict[str, QuantSpec] = {}
    for name, q in quantizers_of(model):
        spec = spec_of(name, q)
        if spec is not None:
            specs[name] = spec
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, dict[str, Any]] = {}
    packed_weight_keys = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, _QUANT_LAYERS):
            continue
        qname = f"{name}.weight_quantizer"
        spec = specs.get(qname)
        if spec is None:
            continue
        codes = weight_codes(qname, spec, layer.weight)
        with torch.no_grad():
            expect = layer.weight_quantizer(layer.weight.detach())
        if not torch.equal(dequantize_codes(spec, codes), expect.float().cpu()):
            raise UserError(f"weight codes of {name} do not reproduce its fake-quant weight; cannot pack it exactly")
        key = f"{name}.weight.codes"
        tensors[key] = pack_codes(codes, spec.bits)
        weights[name] = {"key": key, "quantizer": qname, "bits": spec.bits, "shape": list(codes.shape)}
        packed_weight_keys.add(f"{name}.weight")
    for qname, spec in specs.items():
        for t, v in spec.tensors.items():
            tensors[f"{qname}.{t}"] = v.contiguous()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key in packed_weight_keys or owner in quantizer_names:
            continue
        tensors[key] = value.detach().cpu().contiguous()
    manifest = {"quantizers": {k: s.meta() for k, s in specs.items()}, "weights": weights,
                "module_swaps": _module_swaps(model, reference) if reference is not None else {}}
    return tensors, manifest


def save_packed(model: nn.Module, path: str | Path, info: dict[str, Any], extra: dict[str, Any] | None = None,
                reference: nn.Module | None = None) -> dict[str, Any]:
    """Write the packed checkpoint of `model` (architecture `info` from `common.export.rundir.model_info`).

    `extra` goes into the manifest (method, bits, config, ...). Returns a size report.
    """
    reference = build_architecture(info) if reference is None else reference
    tensors, manifest = pack_model(model, reference)
    manifest = {"format": FORMAT, "version": VERSION, "model": info, "project": project_versions(),
                **(extra or {}), **manifest}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"vitq_manifest": json.dumps(manifest, default=str)})
    tmp.replace(path)
    size, fp = path.stat().st_size, fp32_bytes(reference)
    return {"path": str(path), "bytes": size, "fp32_bytes": fp, "ratio": fp / size if size else math.nan,
            "packed_weights": len(manifest["weights"]), "quantizers": len(manifest["quantizers"])}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The JSON manifest of a packed checkpoint (UserError if the file is not one)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise UserError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from exc
    if "vitq_manifest" not in meta:
        raise UserError(f"{path} is a safetensors file without a vitq manifest: not a packed vitq checkpoint")
    manifest = json.loads(meta["vitq_manifest"])
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > VERSION:
        raise UserError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} "
                        f"v{manifest.get('version')} (this vitq reads {FORMAT} v{VERSION})")
    return manifest


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the quantized model (eval mode, CPU) from a packed checkpoint alone (plus timm)."""
    manifest = read_manifest(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = build_architecture(manifest["model"])
    for name, cls_path in manifest.get("module_swaps", {}).items():
        mod, _, cls = cls_path.rpartition(".")
        if not mod.startswith("torch.nn"):
            raise UserError(f"checkpoint asks for module {cls_path} at {name}; only torch.nn modules are allowed")
        _set_module(model, name, getattr(importlib.import_module(mod), cls)())
    wrap_model(model, QuantScheme(w_bit=32, a_bit=32))  # structure only: every quantizer is the identity
    used: set[str] = set()
    specs: dict[str, QuantSpec] = {}
    for qname, meta in manifest["quantizers"].items():
        qt = {t: tensors[f"{qname}.{t}"] for t in meta["tensors"]}
        used.update(f"{qname}.{t}" for t in meta["tensors"])
        specs[qname] = QuantSpec.from_meta(meta, qt)
        _set_module(model, qname, build_quantizer(specs[qname]))
    state = model.state_dict()
    provided: set[str] = set()
    for layer, w in manifest["weights"].items():
        codes = unpack_codes(tensors[w["key"]], int(w["bits"]), w["shape"])
        state[f"{layer}.weight"] = dequantize_codes(specs[w["quantizer"]], codes)
        provided.add(f"{layer}.weight")
        used.add(w["key"])
    for key, value in tensors.items():
        if key in used:
            continue
        owner, _, leaf = key.rpartition(".")
        if key not in state and leaf == "bias":  # a bias created by LayerNorm reparameterization
            m = model.get_submodule(owner)
            if isinstance(m, nn.Linear) and m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features))
        elif key not in state:
            raise UserError(f"{path}: tensor {key} has no place in the {manifest['model']['timm_name']} architecture")
        state[key] = value
        provided.add(key)
    quantizer_names = {name for name, _ in quantizers_of(model)}
    missing = [k for k in state if k not in provided and k.rpartition(".")[0] not in quantizer_names]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} tensors of the architecture (first: {missing[0]})")
    model.load_state_dict(state, strict=True)
    return model.eval()
