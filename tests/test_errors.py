"""Bad input gives a one-line error naming the problem and the fix, raised before any heavy work.

A few cases go through the real command line (`python run.py ...`, in parallel to save time) to check
exit code 1 and that stderr ends with the `error:` line (no traceback); the rest call the functions,
with the heavy steps (model build, data build) replaced by tripwires where the error must come first.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from common.run import pipeline
from common.errors import UserError
from conftest import REPO, last_line, subprocess_env

TINY_DEIT = ["model=deit_t", "model.pretrained=false", "+model.kwargs.depth=1"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg.strip(), f"multi-line error: {msg!r}"
    return msg


@pytest.fixture
def tripwires(monkeypatch):
    """Fail the test if the model or the data would be built (the error must come before)."""
    import common.data
    import common.models.zoo

    def boom(*_a, **_k):
        raise AssertionError("heavy work started before the configuration error was raised")

    monkeypatch.setattr(common.models.zoo, "build_model", boom)
    monkeypatch.setattr(common.data, "build_data", boom)


@pytest.fixture
def no_data(monkeypatch):
    """Only the data build is a tripwire (model errors come from building the model)."""
    import common.data

    def boom(*_a, **_k):
        raise AssertionError("data built before the model error was raised")

    monkeypatch.setattr(common.data, "build_data", boom)


def _mismatching_checkpoint(path: Path) -> Path:
    """A depth-1 DeiT-Small state dict: does not fit DeiT-Tiny (other widths)."""
    torch.save(timm.create_model("deit_small_patch16_224", pretrained=False, depth=1, num_classes=10).state_dict(), path)
    return path


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Several failing `run.py` invocations, started together (each one mostly imports torch)."""
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = _mismatching_checkpoint(tmp / "deit_s_depth1.pth")
    cases = {
        "unknown_model": (["model=foo"], {}),
        "bits_range": (["bits.w_bit=9"], {}),
        "offline": (["model=deit_t", "+model.kwargs.depth=1"], {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}),
        "mismatch": ([*TINY_DEIT, f"model.checkpoint={ckpt}"], {}),
    }
    procs = {}
    for name, (args, env) in cases.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "run.py", *args, f"hydra.run.dir={tmp / name}", f"stages.shared_dir={tmp / 'cache'}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(**env))
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=240)  # generous: failing fast means seconds, not this
            out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.parametrize("case, expected", [
    ("unknown_model", ["unknown model 'foo'", "available:", "deit_s", "swin_b", "demo", "model=NAME"]),
    ("bits_range", ["bits.w_bit=9 is out of range", "2..8", "32"]),
    ("offline", ["could not get pretrained weights", "deit_tiny_patch16_224", "model.checkpoint="]),
    ("mismatch", ["does not fit model 'deit_t'", "model.checkpoint="]),
])
def test_cli_error_is_last_line(cli, case: str, expected: list[str]) -> None:
    r = cli[case]
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    line = last_line(r.stderr)
    assert line.startswith("error: "), r.stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in r.stderr.splitlines()) == 1
    for text in expected:
        assert text in line, (text, line)


# --------------------------------------------------------------------------- group options (precheck)


@pytest.mark.parametrize("arg, pattern", [
    ("model=foo", r"unknown model 'foo'; available: .*deit_b, deit_s, deit_t, demo, .*model=NAME"),
    ("method=foo", r"unknown method 'foo'; available: .*fp.*ptq.*method=NAME"),
    ("bits=w9a9", r"unknown bits 'w9a9'; available: .*w4a4.*w8a8.*bits=NAME"),
    ("dataset=foo", r"unknown dataset 'foo'; available: auto, .*digits, imagenet, imagenet_sample.*dataset=NAME"),
    ("logger=foo", r"unknown logger 'foo'; available: .*jsonl"),
    ("model=deit_t,bar", r"unknown model 'bar'"),  # each element of a sweep list
])
def test_precheck_unknown_option(arg: str, pattern: str) -> None:
    from run import precheck  # the repo root is on sys.path (conftest)

    with pytest.raises(UserError, match=pattern) as exc:
        precheck([arg])
    _one_line(exc)


def test_precheck_leaves_valid_and_non_group_args_alone() -> None:
    from run import precheck

    precheck(["model=deit_t,swin_s", "bits=w4a4", "method=ptq", "dataset=auto", "+model.kwargs.depth=1",
              "hydra.run.dir=/tmp/x", "-m", "model.checkpoint=/a=b", "experiment=null"])


# --------------------------------------------------------------------------- checks before model/data


@pytest.mark.parametrize("override, pattern", [
    ("bits.w_bit=9", r"bits\.w_bit=9 is out of range: use an integer in 2\.\.8, or 32"),
    ("bits.a_bit=1", r"bits\.a_bit=1 is out of range"),
    ("bits.w_bit=16", r"bits\.w_bit=16 is out of range"),
    ("bits.head_a_bit=0", r"bits\.head_a_bit=0 is out of range"),
    ("bits.a_bit=4.5", r"bits\.a_bit=4\.5 is out of range"),
    ("bits.w_bit=true", r"bits\.w_bit=True is out of range"),
    ("device=tpu", r"device='tpu' is not supported: use auto, cpu or cuda"),
], ids=["w9", "a1", "w16", "head_a0", "a4.5", "w_true", "device"])
def test_bad_values_fail_before_loading(run_cfg, tripwires, override: str, pattern: str) -> None:
    cfg = run_cfg([override])
    with pytest.raises(UserError, match=pattern) as exc:
        pipeline.run(cfg)
    _one_line(exc)


@pytest.mark.parametrize("bits", [["bits.w_bit=32"], ["bits.a_bit=32"], ["bits.w_bit=2", "bits.a_bit=8"]])
def test_bits_edge_values_are_accepted(run_cfg, bits) -> None:
    from common.run.config import validate

    validate(run_cfg(bits))


@pytest.mark.parametrize("overrides, pattern", [
    (["dataset=imagenet", "dataset.root=/nonexistent"], r"'/nonexistent' does not exist.*dataset\.root="),
    (["dataset=imagenet"], r"dataset\.root is not set: set `dataset\.root="),
    (["dataset=imagenet_sample", "dataset.root=/nonexistent/sample"], r"'/nonexistent/sample' does not exist.*dataset\.root="),
], ids=["imagenet_root", "imagenet_no_root", "sample_root"])
def test_missing_dataset_folder_fails_before_loading(run_cfg, tripwires, overrides, pattern) -> None:
    cfg = run_cfg([*TINY_DEIT, *overrides])
    with pytest.raises(UserError, match=pattern) as exc:
        pipeline.run(cfg)
    _one_line(exc)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_for_another_model(run_cfg, no_data, tmp_path) -> None:
    ckpt = _mismatching_checkpoint(tmp_path / "other.pth")
    cfg = run_cfg([*TINY_DEIT, f"model.checkpoint={ckpt}"])
    with pytest.raises(UserError, match=r"does not fit model 'deit_t'.*other shapes.*model\.checkpoint=") as exc:
        pipeline.run(cfg)
    _one_line(exc)


@pytest.mark.parametrize("name, content", [
    ("garbage.pth", b"this is not a checkpoint" * 10),
    ("empty.pth", b""),
    ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"),
], ids=["garbage", "empty", "truncated_safetensors"])
def test_corrupt_checkpoint(run_cfg, no_data, tmp_path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    cfg = run_cfg([*TINY_DEIT, f"model.checkpoint={path}"])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*corrupt.*model\.checkpoint=") as exc:
        pipeline.run(cfg)
    _one_line(exc)


def test_truncated_torch_checkpoint(run_cfg, no_data, tmp_path) -> None:
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1).state_dict(), good)
    bad = tmp_path / "cut.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = run_cfg([*TINY_DEIT, f"model.checkpoint={bad}"])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*model\.checkpoint=") as exc:
        pipeline.run(cfg)
    _one_line(exc)


def test_missing_checkpoint_file(run_cfg, no_data, tmp_path) -> None:
    cfg = run_cfg([*TINY_DEIT, f"model.checkpoint={tmp_path / 'nope.pth'}"])
    with pytest.raises(UserError, match=r"nope\.pth' does not exist: fix `model\.checkpoint=`") as exc:
        pipeline.run(cfg)
    _one_line(exc)
