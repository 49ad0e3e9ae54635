"""FIMA-Q's maths (fimaq spec §4.3–§4.5): the DPLR loss, its schedule and normalisation, the snapshot.

* the DPLR terms equal an independent float64 evaluation of the spec's formula (F_LR = Gᵀ(ΔΔᵀ)⁻¹G formed
  explicitly), the diagonal and low-rank parts separately, and the rank-1 `fisher_lr`;
* the snapshot schedule gives the spec's realised-rank table; `fisher_lr` beyond rank 1 is a one-line error;
* in the engine, the terms are renormalised to p₁, p₂ at every snapshot step and drift in between, the
  head's KL stays unnormalised, and the hook sees the unit in its training state;
* the fast snapshot (cached FP unit input, FP tail only) equals a full-model autograd pass in which only
  the current unit is quantized (float64, same QDrop masks), at the first and at a later snapshot.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.models.units import model_units
from common.quant.quantizers import quantizers_of
from common.recon.adaround import AdaRoundQuantizer
from common.recon import block
from common.recon.block import BlockReconConfig, StepHook, reconstruct_model
from common.recon.teacher import kl_batchmean
from common.run.tracking import Tracker
from fimaq.fisher import FisherSnapshots, teacher_probs, unit_fisher_snapshot
from fimaq.loss import FisherState, check_metric, normalisation, realised_rank, snapshot_steps
from fimaq.method import engine_config

from conftest import read_jsonl, tiny_vit
from test_block_recon import _minmax_calibrated

pytestmark = pytest.mark.usefixtures("one_thread")

N, BS = 32, 8


def _random_state(j: int, d: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.rand(d, generator=g, dtype=dtype) * 1e-3 for _ in range(j)]
    deltas = [torch.rand(d, generator=g, dtype=dtype) * 0.1 + 0.01 for _ in range(j)]
    e_out = torch.randn(6, 3, d // 3, generator=g, dtype=dtype)
    e_tgt = torch.randn(6, 3, d // 3, generator=g, dtype=dtype)
    return grads, deltas, e_out, e_tgt


def _spec_terms(grads, deltas, out, tgt):
    """The spec's formula in numpy float64: rec(e) = eᵀ Gᵀ(ΔΔᵀ)⁻¹G e and eᵀ diag(ḡ) e / D, batch means."""
    G = np.stack([x.numpy() for x in grads])
    Dl = np.stack([x.numpy() for x in deltas])
    e = np.abs(out.numpy() - tgt.numpy()).reshape(out.shape[0], -1)
    f_lr = G.T @ np.linalg.inv(Dl @ Dl.T) @ G  # D x D, rank j
    low = np.mean([eb @ f_lr @ eb for eb in e])
    gbar = G.mean(0)
    diag = np.mean([eb @ np.diag(gbar) @ eb for eb in e]) / e.shape[1]
    lr1 = np.mean([(eb * G[0]).mean() ** 2 for eb in e])
    return low, diag, lr1


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_dplr_terms_equal_the_spec_formula_in_float64(rank):
    grads, deltas, out, tgt = _random_state(rank, 48)
    fs = FisherState("fisher_dplr")
    for g, d in zip(grads, deltas):
        fs.add(g, d)
    assert fs.rank == rank and fs.G.dtype == torch.float64
    terms = fs.terms(out, tgt)
    low, diag, _ = _spec_terms(grads, deltas, out, tgt)
    assert set(terms) == {"lowrank", "diag"}
    np.testing.assert_allclose(float(terms["lowrank"]), low, rtol=1e-9)
    np.testing.assert_allclose(float(terms["diag"]), diag, rtol=1e-12)
    # fp32 (the reference's precision) agrees to float32 accuracy
    fs32 = FisherState("fisher_dplr")
    for g, d in zip(grads, deltas):
        fs32.add(g.float(), d.float())
    t32 = fs32.terms(out.float(), tgt.float())
    np.testing.assert_allclose(float(t32["diag"]), diag, rtol=1e-5)
    np.testing.assert_allclose(float(t32["lowrank"]), low, rtol=1e-2 if rank == 5 else 1e-4)  # (ΔΔᵀ)⁻¹ in fp32


def test_diagonal_and_low_rank_parts_separately():
    grads, deltas, out, tgt = _random_state(3, 30, seed=1)
    low, diag, _ = _spec_terms(grads, deltas, out, tgt)
    fd = FisherState("fisher_diag")
    fl = FisherState("fisher_lr", lr_rank1_only=False)
    for g, d in zip(grads, deltas):
        fd.add(g, d)
        fl.add(g, d)
    assert set(fd.terms(out, tgt)) == {"diag"} and set(fl.terms(out, tgt)) == {"lowrank"}
    np.testing.assert_allclose(float(fd.terms(out, tgt)["diag"]), diag, rtol=1e-12)
    np.testing.assert_allclose(float(fl.terms(out, tgt)["lowrank"]), low, rtol=1e-9)
    # the reference's rank-1 fisher_lr: mean_b (mean_d e_bd G_d)²
    f1 = FisherState("fisher_lr")
    f1.add(grads[0], deltas[0])
    _, _, lr1 = _spec_terms(grads[:1], deltas[:1], out, tgt)
    np.testing.assert_allclose(float(f1.terms(out, tgt)["lr"]), lr1, rtol=1e-12)
    with pytest.raises(UserError, match="rank 1") as err:
        f1.add(grads[1], deltas[1])
    assert "\n" not in str(err.value)
    # the normalisation table: p1 / p2 per term, 2 for the single-term metrics, 1 for mse, head unnormalised
    assert normalisation("fisher_dplr", 0.5, 3.0) | {} == {"head": None, "mse": 1.0, "mae": 1.0,
                                                          "hessian_brecq": 1.0, "lowrank": 0.5, "diag": 3.0}
    assert normalisation("fisher_diag")["diag"] == 2.0 and normalisation("fisher_lr")["lr"] == 2.0


def test_snapshot_schedule_and_realised_rank_table():
    # spec §4.4's table for iters = 20 000 (the reference's rank is not always k)
    table = {1: 1, 2: 2, 3: 4, 4: 4, 5: 5, 6: 7, 7: 8, 8: 8, 10: 10, 12: 13, 15: 16, 20: 20}
    assert {k: realised_rank(20000, k) for k in table} == table
    assert snapshot_steps(20000, 5) == (0, 4000, 8000, 12000, 16000)
    assert realised_rank(20000, 3, exact_rank=True) == 3 and snapshot_steps(20000, 3, exact_rank=True) == (0, 6666, 13332)
    assert snapshot_steps(20000, 5, "qf") == (0, 1, 2, 3, 4)
    assert snapshot_steps(3, 5) == (0, 1, 2)  # ⌊iters/k⌋ = 0 taken as 1 (the reference divides by zero)
    with pytest.raises(UserError, match="works only at rank 1") as err:
        check_metric("fisher_lr", realised_rank(20000, 5), lr_rank1_only=True)
    assert "\n" not in str(err.value)
    check_metric("fisher_lr", 1, True)
    check_metric("fisher_lr", 5, False)
    with pytest.raises(UserError, match="optim metric"):
        check_metric("hessian", 1, True)


# --------------------------------------------------------------------------- engine + snapshots


@pytest.fixture(scope="module")
def setup():
    images = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp = tiny_vit()
    return fp, _minmax_calibrated(fp, images), images


def _fimaq_cfg(metric="fisher_dplr", **kw) -> BlockReconConfig:
    recon = dict(iters=12, batch_size=BS, eval_batch_size=N, log_every=1, w_lr=1e-2, a_lr=1e-3, metric=metric,
                 mode="qdrop", drop_prob=0.5, p1=0.5, p2=1.5, head_norm=None, k=3)
    recon.update(kw)
    return BlockReconConfig(**engine_config(recon))


def test_terms_are_renormalised_at_every_snapshot_and_head_kl_is_not(setup, tmp_path):
    fp, q0, images = setup
    q = copy.deepcopy(q0)
    cfg = _fimaq_cfg()
    steps = snapshot_steps(cfg.iters, 3)
    assert steps == (0, 4, 8)
    tracker = Tracker(tmp_path)
    snaps = FisherSnapshots(fp, teacher_probs(fp, images, batch_size=BS), "fisher_dplr", steps, batch_size=BS,
                            tracker=tracker)
    reconstruct_model(q, fp, images, cfg, tracker=tracker, progress=False, step_hook=snaps.step_hook,
                      unit_loss=snaps.unit_loss)
    recs = read_jsonl(tracker.path)
    for unit in ("patch_embed", "blocks.0", "blocks.1"):
        curve = {r["step"]: r for r in recs if r.get("curve") == f"recon/{unit}"}
        assert sorted(curve) == list(range(1, 13))
        for t, r in curve.items():
            if t - 1 in steps:  # the loss of a snapshot step is p1 + p2 exactly (both terms renormalised to 1)
                assert r["rec"] == pytest.approx(0.5 + 1.5, rel=1e-6), (unit, t)
            assert r["rec_raw"] == pytest.approx(r["rec_lowrank"] + r["rec_diag"], rel=1e-6)
        assert any(abs(r["rec"] - 2.0) > 1e-4 for t, r in curve.items() if t - 1 not in steps), unit
        snap = [r for r in recs if r.get("event") == "fimaq_snapshot" and r["unit"] == unit]
        assert [(r["it"], r["rank"]) for r in snap] == [(0, 1), (4, 2), (8, 3)]
        assert all(r["g_mean"] > 0 and r["delta_mean"] > 0 for r in snap)
        assert [r["step"] for r in recs if r.get("curve") == f"fimaq/{unit}"] == [0, 4, 8]
    head = [r for r in recs if r.get("curve") == "recon/head"]
    assert all(r["rec"] == r["rec_raw"] for r in head)  # the head's KL is not normalised
    assert snaps.ranks == {"patch_embed": 3, "blocks.0": 3, "blocks.1": 3}


def test_per_term_normalisation_is_general(setup, tmp_path):
    """loss_norm {mse: 1}: the mse is normalised to 1 at step 1 (FIMA-Q's mse and BRECQ baseline); {head: 2}:
    APHQ's 2·KL/KL₁ on the head; the default (no table) stays APHQ's 2·rec/rec₁ for everything."""
    fp, q0, images = setup
    for table, expect in (({"mse": 1.0, "head": None}, (1.0, None)), (None, (2.0, 2.0)),
                          ({"head": 2.0}, (2.0, 2.0))):
        q = copy.deepcopy(q0)
        tracker = Tracker(tmp_path / str(table))
        cfg = BlockReconConfig(iters=3, batch_size=BS, eval_batch_size=N, log_every=1, metric="mse", loss_norm=table)
        reconstruct_model(q, fp, images, cfg, tracker=tracker, progress=False)
        recs = read_jsonl(tracker.path)
        first = {r["curve"]: r for r in recs if r.get("curve") and r["step"] == 1}
        assert first["recon/blocks.0"]["rec"] == pytest.approx(expect[0], rel=1e-6)
        if expect[1] is None:
            assert first["recon/head"]["rec"] == first["recon/head"]["rec_raw"]
        else:
            assert first["recon/head"]["rec"] == pytest.approx(expect[1], rel=1e-6)
    with pytest.raises(ValueError, match="unit_loss"):
        reconstruct_model(copy.deepcopy(q0), fp, images, BlockReconConfig(iters=1, metric="custom"), progress=False)


def test_step_hook_sees_the_unit_in_its_training_state(setup):
    fp, q0, images = setup
    q = copy.deepcopy(q0)
    seen = []

    def fn(st):
        ada = [m for m in st.module.modules() if isinstance(m, AdaRoundQuantizer)]
        acts = [qz for _, qz in quantizers_of(st.module, role="act") if qz.active]
        seen.append((st.unit.name, st.step, all(a.soft for a in ada) and bool(ada),
                     all(qz.ste and qz.training and qz.drop_prob == 0.5 for qz in acts),
                     st.fp_in.shape[0], st.iters))

    reconstruct_model(q, fp, images, BlockReconConfig(iters=7, batch_size=BS, eval_batch_size=N, metric="mse"),
                      progress=False, step_hook=lambda unit, i: StepHook(fn, every=3) if unit.kind != "head" else None)
    assert [(u, s) for u, s, *_ in seen] == [(u, s) for u in ("patch_embed", "blocks.0", "blocks.1") for s in (0, 3, 6)]
    assert all(soft and act and n == N and iters == 7 for _, _, soft, act, n, iters in seen)


def _full_model_snapshot(fp, q_module, unit_index, images, probs, temp, bs):
    """Reference emulation: the FP model with ONLY unit `unit_index` replaced by the (training-state) quantized
    unit; whole-model forward from the images, full backward; ∂L/∂O captured at the unit output."""
    fp_unit = model_units(fp)[unit_index].module
    store = {}

    def swap(_m, args, _out):
        o = q_module(args[0])
        o.retain_grad()
        store["o"] = o
        return o

    g_sum = d_sum = 0
    handle = fp_unit.register_forward_hook(swap)
    fp_out = {}
    try:
        for start in range(0, images.shape[0], bs):
            xb = images[start:start + bs]
            with torch.no_grad():
                handle.remove()
                cap = fp_unit.register_forward_hook(lambda _m, _a, out: fp_out.__setitem__("y", out))
                fp(xb)
                cap.remove()
                handle = fp_unit.register_forward_hook(swap)
            fp.zero_grad()
            loss = kl_batchmean(fp(xb), probs[start:start + bs], temp)
            loss.backward()
            g_sum = g_sum + store["o"].grad.abs().flatten(1).sum(0)
            d_sum = d_sum + (store["o"].detach() - fp_out["y"]).abs().flatten(1).sum(0)
    finally:
        handle.remove()
    n = images.shape[0]
    return g_sum / n, d_sum / n


@pytest.mark.parametrize("unit_name", ["patch_embed", "blocks.0", "blocks.1"])
def test_fast_snapshot_equals_full_model_pass_float64(setup, unit_name, monkeypatch):
    fp32, q32, images32 = setup
    # finalize_adaround's bit-exactness self-check is for fp32 weights; this float64 copy is thrown away after
    monkeypatch.setattr(block, "finalize_adaround", lambda _module: 0)
    fp, q, images = copy.deepcopy(fp32).double(), copy.deepcopy(q32).double(), images32.double()
    for m in fp.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    probs = teacher_probs(fp, images, batch_size=BS)
    names = [u.name for u in model_units(fp)]
    index = names.index(unit_name)
    fp_units = model_units(fp)
    checked = []

    def fn(st):
        st.module.double()  # AdaRound builds its α and caches in fp32; this test runs the unit in float64
        seed = 1234 + st.step
        torch.manual_seed(seed)
        g_fast, d_fast = unit_fisher_snapshot(st.module, fp_units, st.index, st.fp_in, st.fp_out, probs, 20.0, BS,
                                              fp_model=fp)
        torch.manual_seed(seed)  # the same QDrop masks in the unit forward
        full = copy.deepcopy(fp)
        for p in full.parameters():
            p.requires_grad_(True)  # the reference's full backward computes every parameter gradient
        g_ref, d_ref = _full_model_snapshot(full, st.module, index, images, probs, 20.0, BS)
        assert g_fast.dtype == torch.float64
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(d_fast, d_ref, rtol=1e-9, atol=1e-15)
        assert float(g_ref.abs().max()) > 0
        checked.append(st.step)

    cfg = BlockReconConfig(iters=6, batch_size=BS, eval_batch_size=N, metric="mse", mode="qdrop", drop_prob=0.5,
                           w_lr=5e-2, a_lr=1e-3)
    reconstruct_model(q, fp, images, cfg, progress=False, start_unit=index, stop_unit=index + 1,
                      step_hook=lambda unit, i: StepHook(fn, steps=(0, 5)) if unit.name == unit_name else None)
    assert checked == [0, 5]
