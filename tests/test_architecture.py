"""The layout's import directions (docs/architecture.md), enforced on every module's `import` statements.

Each module of the project belongs to a part: a subpackage of `common/`, a leaf helper
(`common.errors`, `common.settings`), a method package (a top-level package that a
`conf/method/*.yaml` names as its `module:`), or an entry point (`run.py`, `hydra_plugins`).
A part may import only the parts listed for it in ALLOWED. Imports inside functions count too.
Test files and `bench/` are exempt.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = REPO_REAL = Path(__file__).resolve().parents[1]
LEAF = "common.leaf"  # common.errors, common.settings: import nothing of the project; anyone may import them

#: Allowed project-internal import edges, part -> parts it may import (besides itself and LEAF).
ALLOWED: dict[str, set[str]] = {
    "common.quant": set(),
    LEAF: set(),
    "common.data": set(),
    "common.models": {"common.data"},
    "common.calib": {"common.quant", "common.models", "common.data"},
    "common.recon": {"common.quant", "common.calib", "common.models", "common.data"},
    "common.tasks": {"common.quant", "common.calib", "common.recon", "common.models", "common.data"},
    "common.run": {"common.quant", "common.calib", "common.recon", "common.models", "common.data", "common.tasks"},
    "common.export": {"common.quant", "common.calib", "common.models", "common.data", "common.run", "common.tasks"},
    "common.report": {"common.run"},
    "method": {"common.quant", "common.calib", "common.recon", "common.models", "common.data", "common.tasks",
               "common.run"},
    "entry": {"common.run"},
}
COMMON_PARTS = {p for p in ALLOWED if p.startswith("common.") and p != LEAF}


def method_packages() -> set[str]:
    """Top-level packages that register methods, read from the registry's source: conf/method/*.yaml."""
    mods = set()
    for path in (REPO / "conf" / "method").glob("*.yaml"):
        mod = (yaml.safe_load(path.read_text()) or {}).get("module")
        if mod and not str(mod).startswith("common"):
            mods.add(str(mod).split(".")[0])
    return mods


METHODS = method_packages()


def part_of(module: str) -> str | None:
    """The part a dotted module name belongs to (None: not part of the project)."""
    head = module.split(".")
    if head[0] == "common":
        if len(head) == 1:
            return "common"
        if f"common.{head[1]}" in COMMON_PARTS:
            return f"common.{head[1]}"
        if head[1] in ("errors", "settings"):
            return LEAF
        return f"common.{head[1]}"  # an unknown top-level module of common/: flagged below
    if head[0] in METHODS:
        return f"method:{head[0]}"
    if head[0] in ("hydra_plugins", "run"):
        return "entry"
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from common import calib` imports the subpackage
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names if mod == "common"]
    return out


def project_files() -> list[Path]:
    roots = [REPO / "common", REPO / "hydra_plugins", REPO / "run.py"] + [REPO / m for m in sorted(METHODS)]
    files: list[Path] = []
    for root in roots:
        files += [root] if root.is_file() else sorted(root.rglob("*.py"))
    return files


def violations() -> list[str]:
    bad = []
    for path in project_files():
        src = part_of(module_name(path)) if path.name != "run.py" else "entry"
        src_key = "method" if src and src.startswith("method:") else src
        rel = path.relative_to(REPO)
        if src_key not in ALLOWED and src != "common":
            bad.append(f"{rel}: module outside every part ({src}); move it into a common/ subpackage")
            continue
        for line, mod in imported_modules(path):
            dst = part_of(mod)
            if dst is None or dst == src or dst == LEAF or dst == "common":
                continue
            dst_key = "method" if dst.startswith("method:") else dst
            if dst_key == "method":
                ok = False  # nothing imports a method: run reaches them through the registry
            else:
                ok = dst in ALLOWED.get(src_key, set())
            if not ok:
                target = mod.replace(".", "/")
                bad.append(f"{rel}:{line} ({src}) imports {mod} ({dst}) -> forbidden edge {src} -> {dst} "
                           f"[{target}]")
    return bad


def test_import_directions() -> None:
    bad = violations()
    assert not bad, "forbidden imports (docs/architecture.md):\n" + "\n".join(bad)


def test_method_packages_found() -> None:
    assert {"aphq", "erq"} <= METHODS


@pytest.mark.parametrize("src,dst,ok", [("common.quant", "common.run", False), ("common.recon", "common.run", False),
                                         ("common.run", "common.recon", True), ("common.calib", "common.quant", True),
                                         ("common.models", "common.quant", False)])
def test_rule_table(src: str, dst: str, ok: bool) -> None:
    assert (dst in ALLOWED[src]) is ok


def test_checker_catches_a_forbidden_edge(tmp_path) -> None:
    """The checker itself: a quant module that imports the runner, and a common module importing a method."""
    fake = tmp_path / "repo"
    (fake / "common" / "quant").mkdir(parents=True)
    (fake / "common" / "run").mkdir(parents=True)
    (fake / "conf" / "method").mkdir(parents=True)
    (fake / "aphq").mkdir()
    (fake / "conf" / "method" / "aphq.yaml").write_text("module: aphq\n")
    (fake / "aphq" / "__init__.py").write_text("")
    (fake / "common" / "quant" / "bad.py").write_text("def f():\n    from ..run import pipeline\n")
    (fake / "common" / "run" / "worse.py").write_text("import aphq.method\n")
    globals()["REPO"] = fake
    try:
        globals()["METHODS"] = method_packages()
        bad = violations()
    finally:
        globals()["REPO"] = REPO_REAL
        globals()["METHODS"] = method_packages()
    assert any("common/quant/bad.py:2" in b and "common.quant -> common.run" in b for b in bad), bad
    assert any("common/run/worse.py:1" in b and "method:aphq" in b for b in bad), bad

