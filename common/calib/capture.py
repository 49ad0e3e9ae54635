"""Calibration utilities shared by the methods.

* Capturing: `capture_io` records the inputs/outputs of many modules in ONE forward pass (hooks),
  `iter_unit_inputs` walks the model unit by unit on FP activations so only one unit's tensors live
  in memory at a time (instead of one whole-model forward per module, as the references do).
* Range candidates: min/max, percentile pairs, clip-ratio grids, per granularity.
* Searches: pick the candidate (scale, zero-point) that minimises a reconstruction error, either of the
  tensor itself or of a layer output (for weights via the input Gram matrix: ||X (w - ŵ)||² = eᵀ G e).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from common.quant.granularity import Granularity, PerChannel
from common.quant.primitives import fake_quant_affine, qparams_from_range
from common.models.units import Unit, model_units
from common.quant.quantizers import quant_state
from common.quant.wrap import quant_layers

__all__ = ["capture_io", "iter_unit_inputs", "iter_layer_io", "batched", "reduce_minmax", "reduce_quantile", "clip_candidates",
           "search_weight_by_gram", "search_by_error", "gram_of"]


def batched(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@contextlib.contextmanager
def capture_io(modules: dict[str, nn.Module], inputs: bool = True, outputs: bool = False,
               on_batch: Callable[[str, tuple, torch.Tensor], None] | None = None, arg: int | None = 0):
    """Record inputs (`arg`-th positional input, or all if None) and/or outputs of named modules.

    Yields a dict name -> {"inputs": [tensor per batch], "outputs": [...]}; with `on_batch`, tensors are
    handed to the callback instead of stored (streaming statistics, no activation dump).
    """
    store: dict[str, dict[str, list]] = {n: {"inputs": [], "outputs": []} for n in modules}
    handles = []

    def make_hook(name: str):
        def hook(_m, args, out):
            a = args if arg is None else args[arg]
            if on_batch is not None:
                on_batch(name, a, out)
                return
            if inputs:
                store[name]["inputs"].append(a.detach() if torch.is_tensor(a) else tuple(t.detach() for t in a))
            if outputs:
                store[name]["outputs"].append(out.detach())
        return hook

    for name, m in modules.items():
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def iter_unit_inputs(units: Sequence[Unit], images: torch.Tensor, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> Iterator[tuple[int, Unit, torch.Tensor]]:
    """Yield (index, unit, FP input of the unit's module over all images), propagating FP unit by unit.

    The consumer may calibrate (change) the unit while holding the input; the next input is computed
    after control returns, with the unit's quantizers as they are then (disable them to stay FP).
    """
    x = images
    for i, unit in enumerate(units):
        inp = torch.cat([unit.pre(b.to(device)) for b in batched(x, batch_size)])
        yield i, unit, inp
        x = torch.cat([unit.module(b) for b in batched(inp, batch_size)])


def _flat_by_granularity(x: torch.Tensor, gran: Granularity) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View x as (groups, elements) where groups follow the kept dims; also return the param shape."""
    kept = gran.kept(x.dim())
    perm = list(kept) + [d for d in range(x.dim()) if d not in kept]
    flat = x.permute(perm).reshape(int(torch.tensor([x.shape[d] for d in kept]).prod()) if kept else 1, -1)
    return flat, gran.param_shape(tuple(x.shape))


def reduce_minmax(x: torch.Tensor, gran: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max, shaped for broadcasting against x."""
    flat, shape = _flat_by_granularity(x, gran)
    return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


def reduce_quantile(x: torch.Tensor, gran: Granularity, q: float) -> torch.Tensor:
    """Per-group linear-interpolation quantile (torch.quantile semantics), exact for any size."""
    flat, shape = _flat_by_granularity(x, gran)
    n = flat.shape[1]
    pos = q * (n - 1)
    lo_i, hi_i = int(pos // 1), min(int(pos // 1) + 1, n - 1)
    frac = pos - lo_i
    a = torch.kthvalue(flat, lo_i + 1, dim=1).values
    b = torch.kthvalue(flat, hi_i + 1, dim=1).values if hi_i > lo_i else a
    return (a + (b - a) * frac).reshape(shape)


def clip_candidates(lo: torch.Tensor, hi: torch.Tensor, bits: int, ratios: Iterable[float],
                    round_zero_point: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, zp) candidates for shrunk ranges [r·lo, r·hi]."""
    return [qparams_from_range(lo * r, hi * r, bits, round_zero_point) for r in ratios]


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """XᵀX (float64) of the rows of x flattened to (-1, features)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    return x2.T @ x2


@torch.no_grad()
def search_weight_by_gram(w: torch.Tensor, bits: int, gram: torch.Tensor | None, ratios: Sequence[float],
                          round_zero_point: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric weight qparams minimising the layer-output error on calibration inputs.

    For row i with error e = ŵ_i − w_i, the output SSE over the calibration rows is eᵀ G e (G = XᵀX);
    with `gram=None` the weight MSE (G = I) is used. Ties keep the first (largest-range-first order
    is irrelevant: candidates are compared with strict <).
    """
    gran = PerChannel(0)
    lo, hi = reduce_minmax(w.reshape(w.shape[0], -1), gran)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    w2 = w.reshape(w.shape[0], -1)
    best_err = torch.full((w2.shape[0],), float("inf"), dtype=torch.float64)
    best_s, best_z = None, None
    for scale, zp in clip_candidates(lo, hi, bits, ratios, round_zero_point):
        e = (fake_quant_affine(w2, scale, zp, bits, round_zero_point) - w2).double()
        err = (e @ gram * e).sum(1) if gram is not None else (e * e).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = scale if best_s is None else torch.where(better[:, None], scale, best_s)
        best_z = zp if best_z is None else torch.where(better[:, None], zp, best_z)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return best_s.reshape(shape), best_z.reshape(shape)


@torch.no_grad()
def search_by_error(candidates: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    error: Callable[[torch.Tensor, torch.Tensor], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the candidate (scale, zp) with the smallest `error(scale, zp)` (first wins ties)."""
    best, best_err = None, float("inf")
    for s, z in candidates:
        err = float(error(s, z))
        if err < best_err:
            best, best_err = (s, z), err
    if best is None:
        raise RuntimeError("no finite candidate in scale search")
    return best


def iter_layer_io(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                  desc: str = "calibration", progress: bool = True
                  ) -> Iterator[tuple[str, nn.Module, tuple[torch.Tensor, ...], torch.Tensor]]:
    """The FP walk every layer-by-layer calibration uses: unit by unit, with all quantizers off, one unit
    forward captures the inputs and output of each of its quant layers over all images; yields
    (qname, layer, inputs, output) in forward order. The caller fits the layer before the next one comes
    (still inside the quantizers-off state); a unit's captures are freed as they are handed out."""
    from tqdm.auto import tqdm

    units = model_units(model)
    with quant_state(model, weight=False, act=False):
        walk = iter_unit_inputs(units, images, batch_size, device)
        for _, unit, x in tqdm(walk, total=len(units), desc=desc, disable=not progress, mininterval=2.0):
            layers = dict(quant_layers(unit.module))
            if not layers:
                continue
            with capture_io(layers, arg=None, outputs=True) as io:
                for xb in batched(x, batch_size):
                    unit.module(xb)
            for name, layer in layers.items():
                ins = tuple(torch.cat(t) for t in zip(*io[name]["inputs"]))
                out = torch.cat(io[name]["outputs"])
                io[name] = {"inputs": [], "outputs": []}  # free as we go
                yield getattr(layer, "qname", name), layer, ins, out
                del ins, out
