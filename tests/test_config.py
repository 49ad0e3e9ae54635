"""Config composition: every model x bits (x fp, ptq) and every method, tuned file and experiment composes
to the documented values (golden checks).

Groups are globbed from `conf/`, so a new method, bits, tuned or experiment yaml is covered as soon as it
exists. One Hydra composition costs ~0.13 CPU-s, so each test composes inside ONE Hydra context and
the cross product is taken only where groups can interact.
"""
from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from common.run.config import CONF_DIR, GROUPS, check_group_choice, register_resolvers, resolve_dataset, validate
from common.errors import UserError
from conftest import compose_cfg

# Golden values, written out by hand (not read from the code under test).
MODELS = {  # name: (timm_name, family, default_dataset)
    "deit_t": ("deit_tiny_patch16_224", "vit", "imagenet_sample"),
    "deit_s": ("deit_small_patch16_224", "vit", "imagenet_sample"),
    "deit_b": ("deit_base_patch16_224", "vit", "imagenet_sample"),
    "vit_t": ("vit_tiny_patch16_224", "vit", "imagenet_sample"),
    "vit_s": ("vit_small_patch16_224", "vit", "imagenet_sample"),
    "vit_b": ("vit_base_patch16_224", "vit", "imagenet_sample"),
    "swin_t": ("swin_tiny_patch4_window7_224", "swin", "imagenet_sample"),
    "swin_s": ("swin_small_patch4_window7_224", "swin", "imagenet_sample"),
    "swin_b": ("swin_base_patch4_window7_224", "swin", "imagenet_sample"),
    "demo": ("vit_digits", "vit", "digits"),
}
DOCUMENTED_BITS = {"w2a2", "w3a3", "w3a4", "w4a4", "w4a8", "w5a5", "w6a6", "w8a8"}  # README table
BITS = sorted(p.stem for p in (CONF_DIR / "bits").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
DATASETS = {  # name: keys that must be there with these values
    "digits": {"n_calib": 32, "n_eval": None, "eval_batch_size": 400},
    "imagenet_sample": {"root": None, "calib_pool": 256, "n_calib": 32, "n_eval": None},
    "imagenet": {"n_calib": 32, "n_eval": None},
}


def _bits_of(name: str) -> tuple[int, int]:
    m = re.fullmatch(r"w(\d+)a(\d+)", name)
    assert m, f"conf/bits/{name}.yaml: bits option names must be wNaM"
    return int(m.group(1)), int(m.group(2))


def test_group_options_present() -> None:
    classification = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")
                      if (OmegaConf.load(p).get("task") or "classification") == "classification"}
    assert classification == set(MODELS)  # task=sr / detection models: tests/test_sr_model.py, test_detection*.py
    assert DOCUMENTED_BITS <= set(BITS)
    assert {"fp", "ptq"} <= set(METHODS)
    assert {"auto", *DATASETS} <= {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")}


def test_defaults() -> None:
    cfg = compose_cfg([])
    assert (cfg.model.name, cfg.bits.name, cfg.dataset.name) == ("demo", "w4a4", "auto")
    assert cfg.method.name in METHODS
    assert cfg.seed == 0 and cfg.device == "auto" and cfg.precision.tf32 is False
    assert cfg.stages.reuse is True and cfg.logger.name == "jsonl"
    assert cfg.model.checkpoint.endswith("common/models/assets/vit_digits.safetensors")  # ${vitq.asset:} resolves
    assert cfg.stages.shared_dir.endswith("outputs/stage_cache")


def _check(cfg, model: str, bits: str, method: str) -> None:
    timm_name, family, default_dataset = MODELS[model]
    w, a = _bits_of(bits)
    where = f"model={model} bits={bits} method={method}"
    assert cfg.model.name == model and cfg.model.timm_name == timm_name and cfg.model.family == family, where
    assert cfg.model.default_dataset == default_dataset, where
    assert OmegaConf.is_dict(cfg.model.kwargs), where
    assert cfg.bits.name == bits and (cfg.bits.w_bit, cfg.bits.a_bit) == (w, a), where
    assert cfg.bits.head_a_bit == a and cfg.bits.head_w_bit == w, where  # interpolations follow a_bit / w_bit
    assert cfg.bits.patch_embed_a_bit == 32, where
    assert cfg.method.name == method, f"{where}: conf/method/{method}.yaml must say name: {method}"
    assert isinstance(cfg.method.get("n_calib", 0), int) and cfg.method.get("n_calib", 0) >= 0, where
    assert cfg.dataset.name == "auto", where
    validate(cfg)  # the cheap pre-flight checks accept every shipped combination


def _compose_all(combos) -> None:
    """Compose each (model, bits, method) inside one Hydra context and check it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for model, bits, method in sorted(combos):
                cfg = compose(config_name="config", overrides=[f"model={model}", f"bits={bits}", f"method={method}"])
                _check(cfg, model, bits, method)
    finally:
        GlobalHydra.instance().clear()


def test_every_model_and_bits_composes_with_fp_and_ptq() -> None:
    """The full model x bits product with ptq; fp with every model and every bits option.

    (fp x the full product would add ~10 CPU-s and nothing else: model and bits can only interact with
    the method through a tuned file, and every tuned file is composed in test_every_method_composes.)"""
    combos = {(m, b, "ptq") for m in MODELS for b in BITS}
    combos |= {(m, "w4a4", "fp") for m in MODELS} | {("deit_t", b, "fp") for b in BITS}
    _compose_all(combos)


def test_every_method_composes() -> None:
    """Every method yaml (globbed: new ones are covered at once) and every tuned (method, model, bits) file.

    Groups only interact through `optional tuned: ${method}_${model}_${bits}` (and experiments), so each
    method is composed with the default demo at w4a4, with an ImageNet model at another width, and with
    every combination that has a tuned file; the model and bits nodes must stay what the groups say."""
    combos = {(m, b, me) for me in METHODS for m, b in (("demo", "w4a4"), ("deit_s", "w6a6"))}
    for tuned in (CONF_DIR / "tuned").glob("*.yaml"):
        combos |= {(m, b, me) for me in METHODS for m in MODELS for b in BITS if tuned.stem == f"{me}_{m}_{b}"}
    _compose_all(combos)


def test_every_experiment_composes() -> None:
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for exp in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
                cfg = compose(config_name="config", overrides=[f"experiment={exp}", "model=deit_s"])
                assert cfg.model.name == "deit_s" and cfg.bits.name in BITS, exp
                w, a = _bits_of(cfg.bits.name)
                assert (cfg.bits.w_bit, cfg.bits.a_bit, cfg.bits.head_a_bit) == (w, a, a), exp
                assert cfg.method.name in METHODS, exp
                validate(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("method", METHODS)
def test_method_module_registers_it(method: str) -> None:
    """`method.module` imports and registers `method.name` (what the pipeline looks up)."""
    from common.run.registry import get_method

    node = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    cls = get_method(node.name, node.get("module"))
    assert cls.name == method


def test_bits_overrides_and_interpolation() -> None:
    cfg = compose_cfg(["bits=w4a4", "bits.a_bit=6"])
    assert (cfg.bits.w_bit, cfg.bits.a_bit, cfg.bits.head_a_bit, cfg.bits.head_w_bit) == (4, 6, 6, 4)
    cfg = compose_cfg(["bits=w3a4", "bits.head_a_bit=8", "bits.w_bit=32"])
    assert (cfg.bits.w_bit, cfg.bits.a_bit, cfg.bits.head_a_bit, cfg.bits.head_w_bit) == (32, 4, 8, 32)
    validate(cfg)  # 32 = keep FP is allowed


@pytest.mark.parametrize("model", ["demo", "deit_t", "swin_b"])
def test_dataset_auto(model: str) -> None:
    cfg = compose_cfg([f"model={model}"])
    resolve_dataset(cfg)
    expected = "digits" if model == "demo" else "imagenet_sample"
    assert cfg.dataset.name == expected
    for key, value in DATASETS[expected].items():
        assert cfg.dataset[key] == value, key
    resolve_dataset(cfg)  # idempotent
    assert cfg.dataset.name == expected


def test_dataset_auto_keeps_user_keys_and_explicit_choice() -> None:
    cfg = compose_cfg(["model=deit_t", "+dataset.n_eval=7", "+dataset.eval_batch_size=5"])
    resolve_dataset(cfg)
    assert (cfg.dataset.name, cfg.dataset.n_eval, cfg.dataset.eval_batch_size) == ("imagenet_sample", 7, 5)
    assert cfg.dataset.calib_pool == 256 and cfg.dataset.n_calib == 32  # the rest from imagenet_sample.yaml
    cfg = compose_cfg(["model=demo", "dataset=imagenet_sample", "dataset.n_eval=3"])
    resolve_dataset(cfg)
    assert (cfg.dataset.name, cfg.dataset.n_eval) == ("imagenet_sample", 3)  # an explicit choice wins


def test_group_choice_check() -> None:
    for group in GROUPS:
        for p in (CONF_DIR / group).glob("*.yaml"):
            check_group_choice(group, p.stem)  # every shipped option passes
    check_group_choice("experiment", "null")
    with pytest.raises(UserError, match=r"unknown bits 'w9a9'; available: .*w4a4.*bits=NAME"):
        check_group_choice("bits", "w9a9")
