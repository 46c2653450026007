"""Packaging: every package vtx imports is declared in setup.cfg, and the licence is shipped."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(text: str) -> set[str]:
    return {_normalise(re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0])
            for line in text.strip().splitlines() if line.strip()}


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def declared_requirements() -> set[str]:
    return _requirement_names(_setup_cfg()["options"]["install_requires"])


def declared_extras() -> set[str]:
    """Packages of the optional extras (``pip install vtx[ray]``), the test extra left out."""
    extras = _setup_cfg()["options.extras_require"]
    return {n for name, text in extras.items() if name != "test" for n in _requirement_names(text)}


def imported_modules() -> dict[str, tuple[str, bool]]:
    """Top-level module -> (first file importing it, imported at module level anywhere), for
    every absolute import in vtx/. Imports inside functions (optional, heavy packages imported
    where they are used) are not at module level."""
    found: dict[str, tuple[str, bool]] = {}

    def visit(node: ast.AST, path: Path, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                module = name.split(".")[0]
                where, before = found.get(module, (str(path.relative_to(ROOT)), False))
                found[module] = (where, before or top)
            visit(child, path, inner)

    for path in sorted((ROOT / "vtx").rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path, True)
    return found


def test_every_imported_package_is_declared():
    """A package imported at module level is in install_requires; one imported only inside
    functions (an optional backend) is in install_requires or an extra."""
    declared, extras = declared_requirements(), declared_extras()
    providers = packages_distributions()
    missing = {}
    for module, (where, top) in imported_modules().items():
        if module in sys.stdlib_module_names or module in ("vtx", "__future__"):
            continue
        if module == "tomli":  # the tomllib backport, declared for Python < 3.11 only
            assert "tomli" in declared
            continue
        dists = {_normalise(d) for d in providers.get(module, [])} or {_normalise(module)}
        allowed = declared if top else declared | extras
        if not dists & allowed:
            missing[module] = (sorted(dists), where,
                               "module level" if top else "inside functions: an extra will do")
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_cv2_is_declared_as_the_headless_build():
    assert "opencv-python-headless" in declared_requirements()


def test_mit_licence_file_matches_setup_cfg():
    assert _setup_cfg()["metadata"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text
