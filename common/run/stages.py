"""Stage results saved to disk and reused (resume after a crash or SLURM preemption).

A stage is identified by its name and a signature: a short sha1 of the sorted JSON of exactly the
config values and upstream signatures it depends on (Dora-style), so changing a logging or launcher
key does not invalidate it while changing a hyper-parameter does. Results are written atomically to
`<run_dir>/stages/<name>-<sig>.pt` and, when a shared cache folder is configured, linked there too so
other runs with the same upstream config find them. Every compute/load is appended to
`<run_dir>/stages/events.jsonl`, which tests use to prove that finished stages are not redone.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import UserError

__all__ = ["signature", "StageCache"]


def signature(key: Any) -> str:
    """Stable 10-hex-digit signature of a JSON-able key."""
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


class StageCache:
    """Save / reuse stage results (dicts of tensors and plain values)."""

    def __init__(self, run_dir: str | Path, shared_dir: str | Path | None = None, reuse: bool = True,
                 explicit: dict[str, str | None] | None = None):
        self.dir = Path(run_dir) / "stages"
        self.shared = Path(shared_dir) if shared_dir else None
        self.reuse = reuse
        self.explicit = {k: v for k, v in (explicit or {}).items() if v}
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, sig: str) -> Path:
        return self.dir / f"{name}-{sig}.pt"

    def _log(self, **event) -> None:
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def _find(self, name: str, sig: str) -> Path | None:
        if name in self.explicit:
            p = Path(self.explicit[name]).expanduser()
            if not p.is_file():
                raise UserError(f"stage file for '{name}' not found: {p}; fix the `stages.load.{name}=` path")
            return p
        if not self.reuse:
            return None
        for folder in (self.dir, self.shared):
            if folder is not None and (folder / f"{name}-{sig}.pt").is_file():
                return folder / f"{name}-{sig}.pt"
        return None

    def run(self, name: str, key: Any, compute: Callable[[], dict]) -> tuple[dict, str]:
        """Load the stage result for (name, key) if present, else compute and save it. Returns (result, sig)."""
        sig = signature({"stage": name, "key": key})
        found = self._find(name, sig)
        if found is not None:
            try:
                result = torch.load(found, map_location="cpu", weights_only=False)
            except Exception as exc:  # corrupt or partial file
                if name in self.explicit:
                    raise UserError(f"stage file {found} is unreadable ({type(exc).__name__}); "
                                    f"point `stages.load.{name}=` at a valid file") from exc
                result = None
            if result is not None:
                if name in self.explicit:
                    sig = result.get("_sig", sig)
                self._log(stage=name, sig=sig, event="loaded", path=str(found), t=time.time())
                return result, sig
        t0 = time.time()
        result = compute()
        result["_sig"] = sig
        path = self.path(name, sig)
        tmp = path.with_suffix(".tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
        if self.shared is not None:
            self.shared.mkdir(parents=True, exist_ok=True)
            target = self.shared / path.name
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:
                    torch.save(result, target)
        self._log(stage=name, sig=sig, event="computed", seconds=round(time.time() - t0, 3), t=time.time())
        return result, sig
