"""Settings dataclasses from config nodes: the one builder that every part's `*_config()` uses.

A leaf module: it imports nothing of the project, so the engine (`common.recon`), the methods and the
experiment layer can all build their settings the same way.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Iterable, Mapping, TypeVar

__all__ = ["dataclass_from"]

_D = TypeVar("_D")


def dataclass_from(cls: type[_D], cfg: Any = None, ignored: Iterable[str] = (), label: str = "",
                   **overrides: Any) -> _D:
    """A settings dataclass `cls` from an instance, dict, DictConfig or namespace (+ keyword overrides).

    Keys that are neither fields of `cls` nor in `ignored` (config keys read elsewhere) trigger one
    warning naming them, so a typo in a config node does not pass silently.
    """
    if is_dataclass(cfg) and isinstance(cfg, cls):
        values = asdict(cfg)
    elif cfg is None:
        values = {}
    else:
        values = dict(cfg.items()) if isinstance(cfg, Mapping) or hasattr(cfg, "items") else dict(vars(cfg))
    values.update(overrides)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known - set(ignored)
    if unknown:
        warnings.warn(f"{label or cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
    return cls(**{k: v for k, v in values.items() if k in known})
