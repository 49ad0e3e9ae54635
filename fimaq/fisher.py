"""FIMA-Q's Fisher snapshot (fimaq spec §4.3, §7 items 1–2), started at the unit.

The reference takes each snapshot with the whole model in which only the current unit is quantized
(in its training state: soft AdaRound at the current α, STE activation quantizers, QDrop on) and every
other unit in FP: for each loader batch of 32 it runs model(x) / T, takes KL(p ‖ softmax(·)) 'batchmean'
against the FP teacher's p = softmax(model_FP(x) / T), calls a full backward, and keeps the unit's output
O^q and the gradient g = ∂L/∂O. Per snapshot it returns

    Ĝ = mean_i |g_i|            (D,)    D = one sample's unit output, flattened
    Δ̂ = mean_i |O^q_i − O^fp_i|  (D,)    O^fp the cached FP unit output

Same maths, less work: every unit before the current one is FP, so the unit's input is the cached FP
unit input and nothing before the unit is run; the unit runs once without autograd (its α and scale
gradients are never used: the reference clears them before the next step); only the FP tail after the
unit is run forward and backward, with its parameters frozen, and `torch.autograd.grad` asks for
∂L/∂O only (no weight-gradient GEMMs). The sums run in float64 on the fly (no per-sample storage).
The QDrop masks of the unit forward come from the global RNG, as in the reference.

`FisherSnapshots` plugs this into the engine: its `step_hook` takes a snapshot before each scheduled
training step of a non-head unit (and asks the engine to re-take the loss normalisers), its `unit_loss`
gives the unit's DPLR terms; every snapshot's rank and weight summary goes to the tracker.

`brecq_fisher_sq` is the reference's `fisher_brecq` weighting (spec §4.6): (∂L/∂O)² per sample with the
earlier units quantized (their effect is in the quantized unit input) and this and later units FP.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from common.models.units import Unit, model_units, run_units
from common.recon.block import HookState, StepHook
from common.recon.teacher import kl_batchmean, strict_fp32

from .loss import FIMAQ_METRICS, FisherState

__all__ = ["unit_fisher_snapshot", "teacher_probs", "brecq_fisher_sq", "FisherSnapshots"]


@torch.no_grad()
def teacher_probs(fp_model: nn.Module, images: torch.Tensor, temp: float = 20.0, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """p = softmax(model_FP(x) / T) over `images` in strict fp32, (N, classes) (spec §4.2 item 1)."""
    device = torch.device(device)
    with strict_fp32(fp_model):
        return torch.cat([torch.softmax(fp_model(b.to(device)) / temp, dim=-1) for b in images.split(batch_size)])


def unit_fisher_snapshot(module: nn.Module, fp_units: Sequence[Unit], index: int, fp_in: torch.Tensor,
                         fp_out: torch.Tensor, probs: torch.Tensor, temp: float = 20.0, batch_size: int = 32,
                         divisor: int | None = None, fp_model: nn.Module | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ĝ, Δ̂) of unit `index` in its current state, each (D,) float32 (float64 for a float64 model).

    Args:
        module: the unit being reconstructed, in whatever training state it is in (not changed here).
        fp_units: `model_units(fp_model)`: the FP tail after `index` is run from them.
        index: the unit's position in `fp_units`.
        fp_in, fp_out: the cached FP input and output of the unit over all N images (loader order).
        probs: teacher probabilities (N, classes), same order (`teacher_probs`).
        temp: KL temperature (20).
        batch_size: the reference's loader batch (32), also the 'batchmean' divisor unless `divisor`.
        fp_model: the module whose parameters are frozen for the tail pass (default: the tail units).
    """
    n = fp_in.shape[0]
    g_sum = d_sum = None
    frozen = fp_model if fp_model is not None else nn.ModuleList([u.module for u in fp_units[index + 1:]])
    with strict_fp32(frozen):
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            with torch.no_grad():
                o = module(fp_in[sl])
                d = (o - fp_out[sl]).abs().flatten(1).sum(0, dtype=torch.float64)
            o = o.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = kl_batchmean(run_units(fp_units, o, index + 1), probs[sl].to(o.device), temp,
                                    divisor=divisor)
                g = torch.autograd.grad(loss, o)[0]
            gs = g.abs().flatten(1).sum(0, dtype=torch.float64)
            g_sum = gs if g_sum is None else g_sum + gs
            d_sum = d if d_sum is None else d_sum + d
    dtype = torch.float64 if fp_out.dtype == torch.float64 else torch.float32
    return (g_sum / n).to(dtype), (d_sum / n).to(dtype)


def brecq_fisher_sq(fp_units: Sequence[Unit], index: int, q_in: torch.Tensor, probs: torch.Tensor,
                    temp: float = 20.0, batch_size: int = 32, fp_model: nn.Module | None = None) -> torch.Tensor:
    """(∂L/∂O)² per sample (N, *out): O = FP unit on the quantized input, FP tail (spec §4.6)."""
    frozen = fp_model if fp_model is not None else nn.ModuleList([u.module for u in fp_units[index:]])
    out = []
    with strict_fp32(frozen):
        for start in range(0, q_in.shape[0], batch_size):
            sl = slice(start, min(start + batch_size, q_in.shape[0]))
            with torch.no_grad():
                o = fp_units[index].module(q_in[sl])
            o = o.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = kl_batchmean(run_units(fp_units, o, index + 1), probs[sl].to(o.device), temp)
                out.append(torch.autograd.grad(loss, o)[0].pow(2))
    return torch.cat(out)


class FisherSnapshots:
    """The engine plug-ins of FIMA-Q's loss (`step_hook`, `unit_loss` of `reconstruct_model`).

    Args:
        fp_model: the FP teacher (its units after the current one are the snapshot's tail).
        probs: teacher probabilities over the reconstruction images (`teacher_probs`).
        metric: fisher_dplr | fisher_diag | fisher_lr.
        steps: 0-based training steps before which a snapshot is taken (`fimaq.loss.snapshot_steps`).
        temp, batch_size: KL temperature and the snapshot batch (= 'batchmean' divisor).
        lr_rank1_only, inverse: see `fimaq.loss.FisherState`.
        tracker: gets ``fimaq_snapshot`` records and the ``fimaq/<unit>`` curve (rank and weight summary).
    """

    def __init__(self, fp_model: nn.Module, probs: torch.Tensor, metric: str, steps: Sequence[int],
                 temp: float = 20.0, batch_size: int = 32, lr_rank1_only: bool = True, inverse: str = "inv",
                 tracker=None):
        if metric not in FIMAQ_METRICS:
            raise ValueError(f"FisherSnapshots metric must be one of {FIMAQ_METRICS}, got {metric!r}")
        self.fp_model, self.probs, self.metric, self.steps = fp_model, probs, metric, tuple(steps)
        self.temp, self.batch_size = float(temp), int(batch_size)
        self.lr_rank1_only, self.inverse, self.tracker = bool(lr_rank1_only), str(inverse), tracker
        self.fp_units = model_units(fp_model)
        self.states: dict[str, FisherState] = {}
        self.ranks: dict[str, int] = {}
        self.seconds = 0.0

    def step_hook(self, unit: Unit, index: int) -> StepHook | None:
        if unit.kind == "head":
            return None  # the head trains on KL (no snapshot)
        fs = self.states[unit.name] = FisherState(self.metric, self.lr_rank1_only, self.inverse)

        def snapshot(st: HookState) -> None:
            t0 = time.perf_counter()
            g, d = unit_fisher_snapshot(st.module, self.fp_units, st.index, st.fp_in, st.fp_out, self.probs,
                                        self.temp, self.batch_size, fp_model=self.fp_model)
            fs.add(g, d)
            st.reset_norm = True
            self.ranks[unit.name] = fs.rank
            self.seconds += time.perf_counter() - t0
            if self.tracker is not None:
                summary = fs.summary()
                self.tracker.log({"event": "fimaq_snapshot", "unit": unit.name, "it": st.step, **summary})
                self.tracker.log_curve(f"fimaq/{unit.name}", st.step, **summary)

        return StepHook(snapshot, steps=self.steps)

    def unit_loss(self, unit: Unit, index: int):
        fs = self.states.get(unit.name)
        return fs.terms if fs is not None and unit.kind != "head" else None

    def release(self, name: str) -> None:
        """Drop a finished unit's G, Δ (the reference keeps them: a small leak)."""
        self.states.pop(name, None)
