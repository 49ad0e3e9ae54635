"""Building the full-precision models by short name, with weights from a file or the timm hub.

Every method starts from the same FP model, so weight handling lives here once:

* ``model.checkpoint=/path`` loads a local file strictly (DeiT ``.pth`` with a ``model`` key,
  ``state_dict`` dicts, plain state dicts, ``.safetensors``, original JAX ``.npz`` for ViT/DeiT).
  This is how the papers' numbers are reproduced: APHQ/ERQ used the AdaLog v1.0 release files,
  not timm's current default tags (aphq spec §8).
* ``model.pretrained=true`` with ``model.checkpoint_url`` (the AdaLog v1.0 release file of
  conf/model/NAME.yaml) fetches that file once into torch's hub cache
  (``torch.hub.get_dir()/checkpoints/<file name>``) and loads it like ``model.checkpoint``; a cached
  file is used without any network. ``http(s)://`` and ``file://`` URLs work.
* ``model.pretrained=true`` without either asks the timm / Hugging Face hub (or its cache) for
  ``timm_name.pretrained_tag`` (the tag whose accuracy is the papers' FP column; timm 1.0's default
  tags differ, e.g. ViT-B augreg2 at 85.1% instead of the tables' 84.54%).
  When the network cannot be reached the error names the ways to get weights, and it comes fast:
  huggingface_hub would otherwise retry for about a minute.
* ``model.pretrained=false`` gives a random init (benchmarks, tests).

Every failure a user can fix is a one-line :class:`common.errors.UserError`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import timm.data
import torch
from torch import nn

from common.errors import UserError

__all__ = ["build_model", "data_config", "load_checkpoint", "fetch_checkpoint", "weights_source"]


# --------------------------------------------------------------------------- public API


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Create the FP model described by a ``model`` config node; eval mode, float32, CPU.

    Args:
        cfg: mapping (DictConfig or dict), normally the composed ``model`` group node
            (``conf/model/NAME.yaml``, the one place where a model's timm name lives): ``name``,
            ``timm_name``, optionally ``pretrained_tag`` (timm tag, e.g. ``augreg_in21k_ft_in1k``),
            ``checkpoint`` (path or None), ``checkpoint_url`` (release file fetched into torch's hub
            cache when ``pretrained``), ``pretrained`` (bool, default False) and ``kwargs`` (extra
            ``timm.create_model`` arguments, e.g. ``{"depth": 1}``). Precedence: checkpoint, then
            checkpoint_url, then the hub tag; ``pretrained=false`` without a checkpoint = random init.

    Raises:
        UserError: unknown name, bad kwargs, unreadable or mismatching checkpoint, hub
            weights requested but not obtainable.
    """
    name = _get(cfg, "name")
    timm_name = _get(cfg, "timm_name")
    if not timm_name:
        raise UserError(f"model {name!r} has no timm_name: pick a model from conf/model/ (e.g. `model=deit_s`) "
                        f"or add conf/model/{name}.yaml with its timm_name")
    checkpoint = _get(cfg, "checkpoint")
    url = _get(cfg, "checkpoint_url")
    pretrained = bool(_get(cfg, "pretrained", False))
    kwargs = _plain(_get(cfg, "kwargs") or {})

    if timm_name == "vit_digits" or name == "demo":
        import common.models.demo  # noqa: F401  (registers `vit_digits` in timm)
    if not timm.is_model(timm_name):
        raise UserError(
            f"timm does not know model {timm_name!r} (model.timm_name for {name!r}): "
            "fix `model.timm_name=` or pick a model from conf/model/"
        )

    arch = _tagged(name, timm_name, _get(cfg, "pretrained_tag"))

    if checkpoint not in (None, ""):
        model = _create(arch, pretrained=False, kwargs=kwargs)
        load_checkpoint(model, checkpoint, model_name=name)
    elif pretrained and timm_name == "vit_digits":
        model = _create_digits_pretrained(kwargs)
    elif pretrained and url not in (None, ""):
        path = fetch_checkpoint(str(url), model_name=name, hub_name=arch)
        model = _create(arch, pretrained=False, kwargs=kwargs)
        load_checkpoint(model, path, model_name=name)
    elif pretrained:
        model = _create_from_hub(arch, kwargs)
    else:
        model = _create(arch, pretrained=False, kwargs=kwargs)
    return model.float().cpu().eval()


def weights_source(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Where :func:`build_model` takes the weights of ``cfg`` from (for the results record).

    ``source`` is ``checkpoint`` (``file``), ``checkpoint_url`` (``url`` and the cache ``file``),
    ``timm_hub`` (``timm`` = name.tag), ``bundled`` (the demo) or ``random``.
    """
    timm_name, tag = _get(cfg, "timm_name"), _get(cfg, "pretrained_tag")
    arch = f"{timm_name}.{tag}" if tag else timm_name
    checkpoint, url = _get(cfg, "checkpoint"), _get(cfg, "checkpoint_url")
    if checkpoint not in (None, ""):
        return {"source": "checkpoint", "file": str(checkpoint), "timm": arch}
    if not bool(_get(cfg, "pretrained", False)):
        return {"source": "random", "timm": arch}
    if timm_name == "vit_digits":
        return {"source": "bundled", "timm": arch}
    if url not in (None, ""):
        return {"source": "checkpoint_url", "url": str(url), "file": str(_cache_path(str(url))), "timm": arch}
    return {"source": "timm_hub", "timm": arch}


def fetch_checkpoint(url: str, model_name: str | None = None, hub_name: str | None = None) -> Path:
    """The local copy of a weights file at ``url``, downloaded once into torch's hub cache.

    The file lives at ``torch.hub.get_dir()/checkpoints/<last part of the URL path>`` (``$TORCH_HOME``
    moves it); when it is there, no network is used. Otherwise it is fetched with
    ``torch.hub.download_url_to_file`` (a partial download never replaces the file). ``file://`` URLs
    are read directly (urllib supports them), which is how the tests exercise this path.
    Offline (``HF_HUB_OFFLINE=1``, or the host not answering a 3 s TCP probe without a proxy) fails at
    once with a one-line :class:`UserError`, as any failed download does.
    """
    label = model_name or "the model"
    dst = _cache_path(url)
    if dst.is_file():
        return dst
    parsed = urlparse(url)
    alternative = f"or set `model.checkpoint_url=null` to use the timm hub tag {hub_name}" if hub_name else ""
    fix = (f"pass a local copy with `model.checkpoint=/path/to/{dst.name}`, put the file at {dst}"
           + (f", {alternative}" if alternative else ""))
    if parsed.scheme in ("http", "https") and not _url_reachable(parsed):
        raise UserError(f"could not get pretrained weights for {label!r} from {url} (offline: "
                        f"{parsed.hostname} unreachable or HF_HUB_OFFLINE set) and they are not cached: {fix}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), progress=sys.stderr.isatty())
    except Exception as e:  # urllib / http / file errors come in many types
        raise UserError(f"could not get pretrained weights for {label!r} from {url} "
                        f"({type(e).__name__}: {_first_line(e, 150)}): {fix}") from e
    return dst


def _cache_path(url: str) -> Path:
    """``torch.hub.get_dir()/checkpoints/<file name of url>`` (torch's own cache layout)."""
    from urllib.parse import unquote

    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise UserError(f"model.checkpoint_url={url!r} names no file: fix `model.checkpoint_url=`")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _url_reachable(parsed: Any) -> bool:
    """False when offline mode is set or the URL's host does not answer a TCP probe (a proxy: assume yes)."""
    try:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline:
        return False
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    return _reachable(parsed.hostname or "", port)


def _tagged(name: str, timm_name: str, tag: Any) -> str:
    """``timm_name.tag`` after checking that timm knows the tag (else a one-line UserError)."""
    if tag in (None, ""):
        return timm_name
    arch = f"{timm_name}.{tag}"
    known = timm.list_pretrained(f"{timm_name}.*")
    if arch not in known:
        tags = ", ".join(k.split(".", 1)[1] for k in known) or "none"
        raise UserError(f"timm has no pretrained tag {tag!r} for {timm_name!r} (model.pretrained_tag of {name!r}); "
                        f"its tags: {tags}: fix `model.pretrained_tag=`")
    return arch


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model`` (input size, interpolation, mean, std, crop_pct, crop_mode)."""
    return timm.data.resolve_model_data_config(model)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], model_name: str | None = None) -> None:
    """Load a weights file into ``model`` strictly (every key, every shape), in place.

    Formats: ``.safetensors``; ``.npz`` (original JAX/big_vision ViT checkpoints, via timm's
    own npz reader; ViT/DeiT only); anything else goes through ``torch.load(weights_only=True)``
    and may be a plain state dict or a dict holding it under ``model`` or ``state_dict``
    (DeiT release / training checkpoints). A leading ``module.`` (DataParallel/DDP) is stripped.
    If the keys do not match as they are, timm's ``checkpoint_filter_fn`` for the model's
    architecture is tried (it converts e.g. original Swin release files and drops the
    ``relative_position_index``/``attn_mask`` buffers that timm 0.9 checkpoints carry).

    Raises:
        UserError: missing, unreadable or mismatching file.
    """
    path = Path(path).expanduser()
    label = model_name or type(model).__name__
    if not path.is_file():
        raise UserError(
            f"checkpoint file {str(path)!r} does not exist: fix `model.checkpoint=` "
            "(or drop it and set `model.pretrained=true` to use the timm hub)"
        )
    if path.suffix.lower() == ".npz":
        _load_npz(model, path, label)
        return
    state_dict = _read_state_dict(path)
    _load_state_dict_strict(model, state_dict, path, label)


# --------------------------------------------------------------------------- creation


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]`` for dicts and DictConfigs alike, ``default`` when absent."""
    try:
        value = cfg.get(key, default)
    except AttributeError as e:  # not a mapping at all
        raise UserError(f"the model config must be a mapping, got {type(cfg).__name__}: check `model=`") from e
    return default if value is None and default is not None else value


def _plain(value: Any) -> dict[str, Any]:
    """``model.kwargs`` as a plain dict (DictConfig/ListConfig values become dicts/lists)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - hydra installs omegaconf
        pass
    if not isinstance(value, Mapping):
        raise UserError(f"model.kwargs must be a mapping of timm arguments, got {value!r}: fix `model.kwargs`")
    return dict(value)


def _create_digits_pretrained(kwargs: dict[str, Any]) -> nn.Module:
    """The demo model with its bundled weights (no hub involved)."""
    try:
        return _create("vit_digits", pretrained=True, kwargs=kwargs)
    except FileNotFoundError as e:
        raise UserError(f"{_first_line(e)} (or pass `model.checkpoint=`)") from e


def _create(timm_name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with bad ``kwargs`` turned into a UserError."""
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise UserError(
            f"timm model {timm_name!r} rejected model.kwargs={kwargs}: {_first_line(e)}; fix `model.kwargs`"
        ) from e


def _create_from_hub(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(pretrained=True)``; any hub failure becomes a UserError naming both fixes."""
    try:
        with _fail_fast_when_hub_unreachable():
            return timm.create_model(timm_name, pretrained=True, **kwargs)
    except TypeError as e:
        raise UserError(
            f"timm model {timm_name!r} rejected model.kwargs={kwargs}: {_first_line(e)}; fix `model.kwargs`"
        ) from e
    except Exception as e:  # hub / network / cache errors come in many types
        raise UserError(
            f"could not get pretrained weights for {timm_name!r} from the timm hub "
            f"({type(e).__name__}: {_first_line(e)}): either pass a local file with "
            f"`model.checkpoint=/path/to/{timm_name.split('.')[0]}.pth` (the AdaLog v1.0 release files reproduce "
            "the papers' numbers) or enable Hugging Face hub access / point HF_HOME at a populated cache"
        ) from e


def _hub_endpoint() -> tuple[str, int]:
    """Host and port of the Hugging Face endpoint (honours ``HF_ENDPOINT``)."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """One TCP connection attempt: True when ``host:port`` answers within ``timeout`` s."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the hub endpoint: True when it answers within ``timeout`` s."""
    return _reachable(*_hub_endpoint(), timeout=timeout)


@contextlib.contextmanager
def _fail_fast_when_hub_unreachable() -> Iterator[None]:
    """While hub weights are fetched: if the hub cannot be reached, act as ``HF_HUB_OFFLINE=1``.

    Without this, huggingface_hub retries a dead network for ~1 minute before failing. The
    switch is scoped to this call (the user's environment is not changed): a populated cache
    still serves the files, a missing one fails at once. Skipped when the user already set
    offline mode, or uses a proxy (a direct probe says nothing then).
    """
    try:
        from huggingface_hub import constants
    except Exception:  # pragma: no cover
        yield
        return
    proxied = any(os.environ.get(v) for v in _PROXY_VARS)
    if constants.HF_HUB_OFFLINE or proxied or _hub_reachable():
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# --------------------------------------------------------------------------- torch / safetensors files


def _first_line(e: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened, so UserErrors stay one line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a torch or safetensors file and return its (unwrapped, ``module.``-stripped) state dict."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # DeiT training checkpoints also hold `args` (an argparse.Namespace): allow just that.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        detail = str(e)
        if "WeightsUnpickler error:" in detail:  # torch's long weights_only message: keep the cause
            detail = detail.split("WeightsUnpickler error:", 1)[1].strip()
        if "Unsupported global" in detail:
            found = re.search(r"GLOBAL (\S+)", detail)
            raise UserError(
                f"checkpoint {str(path)!r} holds pickled Python objects ({found.group(1) if found else 'unknown'}) "
                "that are not loaded for safety (torch.load weights_only=True): re-save just the state dict, "
                "e.g. torch.save(ckpt['model'], 'weights.pth'), and fix `model.checkpoint=`"
            ) from e
        raise UserError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {_first_line(RuntimeError(detail))}): "
            "the file is corrupt, truncated or not a torch/safetensors state dict; re-download it or fix "
            "`model.checkpoint=`"
        ) from e

    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {list(obj)[:5]}"
        raise UserError(
            f"checkpoint {str(path)!r} holds no state dict (found {kind}); expected a state dict, "
            "or a dict with it under 'model' or 'state_dict': fix `model.checkpoint=`"
        )
    state_dict = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches (as ``key: ckpt vs model`` strings)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def _timm_filter(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The model module's timm ``checkpoint_filter_fn`` applied to ``state_dict`` (None if unavailable)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return None
    try:
        out = fn(dict(state_dict), model)
    except Exception:
        return None
    return dict(out) if isinstance(out, Mapping) else None


def _load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, label: str) -> None:
    """Load exactly (keys and shapes), trying timm's converter second; else a UserError."""
    problems = _mismatch(model, state_dict)
    if any(problems):
        converted = _timm_filter(model, state_dict)
        if converted is not None:
            converted_problems = _mismatch(model, converted)
            if not any(converted_problems):
                state_dict, problems = converted, converted_problems
            elif sum(map(len, converted_problems)) < sum(map(len, problems)):
                problems = converted_problems
    missing, unexpected, shapes = problems
    if missing or unexpected or shapes:
        example = (shapes or missing or unexpected)[0]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit model {label!r}: {len(missing)} keys missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} with other shapes (e.g. {example}); "
            f"is this checkpoint for model {label}? pick the matching `model=` or fix `model.checkpoint=`"
        )
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- npz (JAX / big_vision ViT)


def _load_npz(model: nn.Module, path: Path, label: str) -> None:
    """Load an original JAX/big_vision ``.npz`` into a ViT/DeiT with timm's reader, made strict.

    timm's reader silently skips a classifier of another size and ignores surplus blocks; both
    would leave a wrong model, so they are checked here first.
    """
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"checkpoint {str(path)!r} is an .npz (JAX) file, which is only supported for ViT/DeiT models, "
            f"not {label!r}: convert it to .pth/.safetensors or fix `model.checkpoint=`"
        )
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            keys = list(npz.files)
            shapes = {k: tuple(npz[k].shape) for k in keys if k.endswith(("head/kernel", "head/bias"))}
            stacked = {k: tuple(npz[k].shape) for k in keys if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")}
    except Exception as e:
        raise UserError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {_first_line(e)}): the file is corrupt, "
            "truncated or not an .npz archive; re-download it or fix `model.checkpoint=`"
        ) from e

    anchors = [k for k in keys if k.endswith("embedding/kernel") and not k.endswith("pos_embedding/kernel")]
    prefix = min(anchors, key=len)[: -len("embedding/kernel")] if anchors else None
    hint = f"is this checkpoint for model {label}? pick the matching `model=` or fix `model.checkpoint=`"
    if prefix is None:
        raise UserError(f"checkpoint {str(path)!r} has no 'embedding/kernel': not a JAX ViT checkpoint; {hint}")

    n_blocks = len(model.blocks)
    if stacked:
        n_ckpt = next(iter(stacked.values()))[0]
    else:
        found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))}
        n_ckpt = max(found) + 1 if found else 0
    if n_ckpt != n_blocks:
        raise UserError(f"checkpoint {str(path)!r} has {n_ckpt} transformer blocks, model {label!r} has {n_blocks}; {hint}")

    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        kernel = shapes.get(f"{prefix}head/kernel")
        if kernel is None or kernel[-1] != head.out_features:
            found_classes = "no classifier" if kernel is None else f"{kernel[-1]} classes"
            raise UserError(
                f"checkpoint {str(path)!r} has {found_classes}, model {label!r} has {head.out_features}; {hint}"
            )
    try:
        model.load_pretrained(str(path), prefix=prefix)
    except KeyError as e:
        raise UserError(f"checkpoint {str(path)!r} lacks key {e.args[0]!r} that model {label!r} needs; {hint}") from e
    except (RuntimeError, ValueError) as e:
        raise UserError(f"checkpoint {str(path)!r} does not fit model {label!r} ({_first_line(e, 150)}); {hint}") from e
