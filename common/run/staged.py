"""The stage plumbing that the cached-stage methods (APHQ, FIMA-Q, AdaLog) share.

`StagedMethod` is a `PTQMethod` with: image counts capped at what the dataset holds (a warning and a
`<prefix>_n_images_capped` event), calibration draws per config section, stage keys without the
no-effect switches, stage signatures (the file's own `_sig` for an explicit `stages.load.<stage>`),
availability of saved stages, resuming from the latest available stage of a chain, per-unit partial
checkpoints, evaluation and stage summaries. A method keeps its own maths and stage choices.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from omegaconf import OmegaConf
from torch import nn

from common.calib.calibrate import LN_SITES, CalibConfig, calibrate_model, load_quant_state, reparam_active
from common.quant.wrap import wrap_model
from common.run.evaluate import predict, topk_accuracy
from common.run.registry import PTQMethod, scheme_from_bits
from common.run.stages import signature

__all__ = ["StagedMethod", "StageMissing", "plain", "cpu_state", "missing"]


class StageMissing(RuntimeError):
    """Raised by the compute function of a stage that was expected on disk."""


def missing() -> dict:
    raise StageMissing()


def plain(node: Any) -> Any:
    """A config node as plain containers (a deep copy of anything else)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else copy.deepcopy(node)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class StagedMethod(PTQMethod):
    """Base of the methods built from cached stages (see the module docstring)."""

    #: prefix of this method's log messages and tracker events (`<prefix>_n_images_capped`, …)
    prefix: ClassVar[str] = ""
    #: how the capping warning names the calibration source
    calib_source: ClassVar[str] = "the dataset's calibration source"
    #: keys that cannot change a stage's result (left out of the stage signatures)
    no_effect: ClassVar[tuple[str, ...]] = ("log_every", "evaluate", "prune", "memo", "resume", "eval_stats")
    #: the method module's logger
    logger: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def n_calib(self) -> int:
        return int(self.cfg.calib.n_images)

    # ------------------------------------------------------------------ data

    def _n(self, data, section: str, quiet: bool = False) -> int:
        """Images a stage draws, capped (with a warning unless `quiet`) at what the dataset holds."""
        want = int(self.cfg[section].n_images)
        have = int(getattr(data, "n_calib_available", want))
        if want > have and quiet:
            return have
        if want > have:
            self.logger.warning(f"{self.prefix}: %s.n_images=%d but {self.calib_source} has %d images; using %d",
                                section, want, have, have)
            self.ctx.tracker.log({"event": f"{self.prefix}_n_images_capped", "section": section, "requested": want,
                                  "used": have})
            return have
        return want

    def _images(self, data, section: str) -> torch.Tensor:
        node = self.cfg[section]
        images, _ = data.calibration(self._n(data, section), augment=bool(node.get("augment", True)),
                                     draw=int(node.get("draw", 0)))
        return images

    # ------------------------------------------------------------------ wrapping

    def _scheme(self):
        """APHQ's placement: uniform asymmetric quantizers, per-head matmuls, channel-wise LN outputs when
        the reparameterization is active (APHQ, FIMA-Q; AdaLog overrides)."""
        calib = CalibConfig.from_node(plain(self.cfg.calib))
        bits = self.bits
        reparam = reparam_active(calib, int(bits.w_bit), int(bits.a_bit))
        return scheme_from_bits(bits, matmul_granularity="head", act_granularity="tensor",
                                ln_act_granularity="channel" if reparam else "tensor", ln_sites=LN_SITES,
                                round_zero_point=True, symmetric_weights=False, softmax_quantizer="uniform")

    def _calibrate(self, model: nn.Module, data) -> dict:
        """The calibration stage of APHQ and FIMA-Q: wrapping and APHQ's calibration search
        (`common.calib.calibrate`), the calibrated model's accuracy unless `calib.evaluate=false`."""
        ccfg = CalibConfig.from_node(plain(self.cfg.calib))
        t0 = time.perf_counter()
        images = self._images(data, "calib")
        wrap_model(model, self._scheme())
        model.to(self.ctx.device)
        rec = calibrate_model(model, images, ccfg, int(self.bits.w_bit), int(self.bits.a_bit), self.ctx.device)
        summary: dict[str, Any] = {"calib_seconds": round(time.perf_counter() - t0, 3),
                                   "calib_images": images.shape[0], "calib_reparam": rec["reparam"]}
        if bool(self.cfg.calib.get("evaluate", True)):
            acc = self._evaluate(model, data, "calibrated eval")
            summary.update({f"calib_{k}": v for k, v in acc.items()})
        return {"state_dict": cpu_state(model), "records": rec, "summary": summary}

    # ------------------------------------------------------------------ stage plumbing

    def _stripped(self, *nodes: Any) -> list[dict]:
        """Config nodes as plain dicts without the `no_effect` keys."""
        out = [plain(node) for node in nodes]
        for d in out:
            for k in self.no_effect:
                d.pop(k, None)
        return out

    def _sig(self, name: str, key: dict) -> str:
        """Signature of a stage (the file's own `_sig` for an explicit `stages.load.<name>`)."""
        stages = self.ctx.stages
        if name in stages.explicit:
            path = Path(stages.explicit[name]).expanduser()
            if path.is_file():
                res = torch.load(path, map_location="cpu", weights_only=False)
                if "_sig" in res:
                    return res["_sig"]
        return signature({"stage": name, "key": {"base": self.ctx.base_key, "key": key}})

    def _available(self, name: str, sig: str) -> bool:
        stages = self.ctx.stages
        if name in stages.explicit:
            return True
        if not stages.reuse:
            return False
        return any(folder is not None and (Path(folder) / f"{name}-{sig}.pt").is_file()
                   for folder in (stages.dir, stages.shared))

    def _chain(self, chain: list[str], keys: dict[str, dict]) -> dict[str, str]:
        """Add each stage's upstream signature to its key (in place); the stages' signatures."""
        sigs: dict[str, str] = {}
        upstream = None
        for name in chain:
            keys[name] = dict(keys[name], upstream=upstream)
            sigs[name] = upstream = self._sig(name, keys[name])
        return sigs

    def _resume(self, chain: list[str], keys: dict[str, dict], sigs: dict[str, str],
                restore: Callable[[str, dict], None]) -> int:
        """Load the latest available stage of `chain` (earlier ones are not touched; an unreadable file
        falls back to the stage before), `restore` it and report it; its index, -1 for none."""
        last = max((i for i, n in enumerate(chain) if self._available(n, sigs[n])), default=-1)
        while last >= 0:
            name = chain[last]
            try:
                res, _ = self.ctx.stage(name, keys[name], missing)
            except StageMissing:
                last -= 1
                continue
            restore(name, res)
            self._report(name, res)
            break
        return last

    def _run_rest(self, chain: list[str], keys: dict[str, dict], computes: dict[str, Callable[[], dict]],
                  load: Callable[[str, dict], None]) -> None:
        """Run (or load) each stage of `chain` in order with its compute function, `load` its result into
        the model and report it."""
        for name in chain:
            res, _ = self.ctx.stage(name, keys[name], computes[name])
            load(name, res)
            self._report(name, res)

    def _report(self, name: str, res: dict) -> None:
        """Log a stage's summary numbers (accuracies, timings) to the run's metrics."""
        summary = {k: v for k, v in (res.get("summary") or {}).items() if isinstance(v, (int, float))}
        if summary:
            self.ctx.tracker.log({"event": f"{name}_summary", **summary})

    def _evaluate(self, model: nn.Module, data, desc: str) -> dict[str, float]:
        if not hasattr(data, "eval_loader"):
            return {}
        logits, labels = predict(model, data.eval_loader(), self.ctx.device, desc)
        return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}

    # ------------------------------------------------------------------ per-unit checkpoints

    def _partial_paths(self, name: str, sig: str) -> list[Path]:
        stages = self.ctx.stages
        return [Path(folder) / f"{name}-{sig}.partial.pt" for folder in (stages.dir, stages.shared)
                if folder is not None]

    def _load_partial(self, model: nn.Module, name: str, partials: list[Path]) -> tuple[int, dict]:
        """Resume a unit-by-unit stage from its first partial checkpoint: (next unit, finished units' stats)."""
        for p in partials:
            if p.is_file():
                part = torch.load(p, map_location="cpu", weights_only=False)
                load_quant_state(model, part["state_dict"])
                start, done = int(part["next_unit"]), dict(part.get("units", {}))
                self.ctx.tracker.log({"event": f"{name}_resumed", "next_unit": start, "path": str(p)})
                return start, done
        return 0, {}

    @staticmethod
    def _save_partial(partials: list[Path], part: dict) -> None:
        for p in partials:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            torch.save(part, tmp)
            os.replace(tmp, p)

    @staticmethod
    def _sec_per_iter(units: dict) -> float:
        per_iter = [u["sec_per_iter"] for u in units.values() if u.get("iters")]
        return (sum(per_iter) / len(per_iter)) if per_iter else 0.0
