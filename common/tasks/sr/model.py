"""SwinIR through spandrel, as a quantizable model: loading, window-attention wrapping, sites and units.

* `build_sr_model(cfg)` loads an official SwinIR `.pth` (or the demo `.safetensors`) with spandrel's
  `ModelLoader` (architecture, scale and sizes detected from the keys; spandrel's SwinIR is the official
  code), puts it in eval mode with drop-path 0 (spandrel returns it in train mode, drop-path 0.1), and
  returns an `SRModel` around it.
* `QuantSwinIRAttention`: spandrel's `WindowAttention` with q·kᵀ and attn·v as `QuantMatMul`s (q
  pre-scaled, relative-position bias, shift mask and softmax in FP, as timm's Swin in `common.quant.wrap`),
  registered with `common.quant.wrap.register_attention` on import.
* Sites (`SRModel.quant_site`): `conv_first` (the image → features conv) is the `patch_embed` site, so
  `bits.patch_embed_a_bit` / the methods' `patch_embed_a_bit` set its input bits (ERQ's SR code: 8);
  every other conv (RSTB convs, conv_after_body, conv_before_upsample, upsample, conv_last) is the `conv`
  site (per-tensor input at `a_bit`); linears keep their ViT sites (qkv, proj, fc1, fc2).
* Units (`SRModel.vitq_units`, read by `common.models.units.model_units`): `conv_first`, `layers.0` …
  `layers.{L-1}` (one RSTB each), `tail` (conv_after_body + the long skip + upsampler). The tensor passed
  between units is `cat([shallow, deep], channels)`: the shallow features ride along for the long skip,
  so each unit maps one tensor to one tensor. Chained, the units equal the model on inputs whose sides
  are multiples of the window (calibration patches); `SRModel.forward` pads other inputs first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from common.errors import UserError
from common.models.units import Unit
from common.quant.scheme import site_of
from common.quant.wrap import register_attention

__all__ = ["SRModel", "QuantSwinIRAttention", "build_sr_model", "load_swinir"]

try:  # spandrel is a dependency; importing it here keeps `common.quant` free of it
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR, WindowAttention
except Exception:  # pragma: no cover
    SwinIR = WindowAttention = None  # type: ignore[assignment,misc]


if WindowAttention is not None:
    class QuantSwinIRAttention(WindowAttention):  # type: ignore[misc,valid-type]
        """spandrel (official) SwinIR WindowAttention with quantizable matmuls."""

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
            ws = self.window_size[0] * self.window_size[1]
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(ws, ws, -1)
            attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, n)
            attn = self.attn_drop(self.softmax(attn))
            x = self.matmul2(attn, v).transpose(1, 2).reshape(b, n, c)
            return self.proj_drop(self.proj(x))

    register_attention(WindowAttention, QuantSwinIRAttention)
else:  # pragma: no cover
    QuantSwinIRAttention = None  # type: ignore[assignment,misc]


class _Shallow(nn.Module):
    """Unit `conv_first`: normalised image -> cat([s, s]) with s = conv_first(image)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv_first = net.conv_first
        self._net = [net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net[0]
        s = self.conv_first((x - net.mean.type_as(x)) * net.img_range)
        return torch.cat([s, s], 1)


class _Body(nn.Module):
    """Unit `layers.i`: one RSTB on the deep half of the carried tensor (patch-embed norm before the
    first, the final norm after the last)."""

    def __init__(self, net: nn.Module, i: int):
        super().__init__()
        self.layer = net.layers[i]
        self.first, self.last = i == 0, i == len(net.layers) - 1
        self._net = [net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net[0]
        s, f = x.chunk(2, 1)
        size = (f.shape[2], f.shape[3])
        if self.first:
            t = net.patch_embed(f)
            if net.ape:
                t = t + net.absolute_pos_embed
            t = net.pos_drop(t)
        else:
            t = f.flatten(2).transpose(1, 2)
        t = self.layer(t, size)
        if self.last:
            t = net.norm(t)
        return torch.cat([s, net.patch_unembed(t, size)], 1)


class _Tail(nn.Module):
    """Unit `tail`: conv_after_body(deep) + shallow, then the upsampler, de-normalised."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv_after_body = net.conv_after_body
        if net.upsampler == "pixelshuffle":
            self.conv_before_upsample, self.conv_last = net.conv_before_upsample, net.conv_last
        self.upsample = net.upsample
        self._net = [net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net[0]
        s, f = x.chunk(2, 1)
        y = self.conv_after_body(f) + s
        if net.upsampler == "pixelshuffle":
            y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        else:
            y = self.upsample(y)
        return y / net.img_range + net.mean.type_as(y)


class SRModel(nn.Module):
    """A SwinIR network (`net`) with its upscaling factor, quantization sites and units."""

    family = "swinir"

    def __init__(self, net: nn.Module, scale: int):
        super().__init__()
        self.net = net
        self.scale = int(scale)
        self.window = int(net.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def quant_site(name: str, module: nn.Module) -> str:
        if isinstance(module, nn.Conv2d):
            return "patch_embed" if name.split(".")[-1] == "conv_first" else "conv"
        return site_of(name, module)

    def vitq_units(self) -> list[Unit]:
        net = self.net
        if net.upsampler not in ("pixelshuffle", "pixelshuffledirect") or getattr(net, "start_unshuffle", 1) != 1:
            raise UserError(f"SwinIR with upsampler={net.upsampler!r} is not supported for quantization "
                            "(classical / lightweight SR only: pixelshuffle, pixelshuffledirect)")
        units = [Unit("conv_first", _Shallow(net), kind="patch_embed")]
        units += [Unit(f"layers.{i}", _Body(net, i)) for i in range(len(net.layers))]
        units.append(Unit("tail", _Tail(net), kind="tail"))
        return units


def _no_drop_path(net: nn.Module) -> None:
    for m in net.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0


def load_swinir(path: str | os.PathLike[str]) -> tuple[nn.Module, int]:
    """(SwinIR network in eval mode, scale) from an official `.pth` / a `.safetensors` file, via spandrel."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"model.checkpoint={str(p)!r} does not exist: point it at a SwinIR release file "
                        "(e.g. 001_classicalSR_DIV2K_s48w8_SwinIR-M_x2.pth)")
    try:
        from spandrel import ModelLoader
    except ImportError as exc:  # pragma: no cover
        raise UserError("task=sr needs spandrel: pip install -c constraints.txt spandrel") from exc
    try:
        desc = ModelLoader(device="cpu").load_from_file(str(p))
    except Exception as exc:
        raise UserError(f"spandrel cannot load {p.name}: {str(exc).splitlines()[0][:200]}") from exc
    if desc.architecture.id != "SwinIR":
        raise UserError(f"{p.name} is a {desc.architecture.id} model, not SwinIR")
    net = desc.model.float().cpu().eval()
    _no_drop_path(net)
    return net, int(desc.scale)


def build_sr_model(cfg: Mapping[str, Any]) -> SRModel:
    """SRModel for a `conf/model/swinir_*.yaml` node (`checkpoint`, or `weights_dir`/`release_file`; `scale`)."""
    ckpt = cfg.get("checkpoint")
    if ckpt in (None, "") and cfg.get("weights_dir") and cfg.get("release_file"):
        ckpt = str(Path(str(cfg.get("weights_dir"))).expanduser() / str(cfg.get("release_file")))
    if ckpt in (None, ""):
        raise UserError(f"model {cfg.get('name')!r} needs model.checkpoint= (no SwinIR weights can be downloaded "
                        "here): the official release file, e.g. 001_classicalSR_DIV2K_s48w8_SwinIR-M_x2.pth")
    net, scale = load_swinir(ckpt)
    want = cfg.get("scale")
    if want is not None and int(want) != scale:
        raise UserError(f"model {cfg.get('name')!r} expects scale x{want}, but {Path(str(ckpt)).name} is x{scale}")
    return SRModel(net, scale).eval()
