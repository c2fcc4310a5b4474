"""The package's import rules (README, Layout), checked statically on every module's source, lazy imports inside
functions included: the user workflows are imported by nothing; ``data/`` knows no training; ``losses/`` is pure
torch; trainers and the site side never reach the server side, the Flower transport or the workflows."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_fedkd"
SERVER_SIDE = {"nnunetv2_fedkd.federated.aggregation", "nnunetv2_fedkd.federated.update_checks",
               "nnunetv2_fedkd.federated.strategies", "nnunetv2_fedkd.federated.round_core",
               "nnunetv2_fedkd.federated.runner", "nnunetv2_fedkd.federated.planning",
               "nnunetv2_fedkd.federated.results_folder", "nnunetv2_fedkd.flower.server_app",
               "nnunetv2_fedkd.flower.strategy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (relative imports resolved; for
    ``from pkg import name`` both ``pkg`` and ``pkg.name``, since the name may be a submodule)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


@lru_cache(maxsize=1)
def package_imports() -> Dict[str, Set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def offenders(importer_prefix: str, forbidden) -> Dict[str, list]:
    out = {}
    for mod, imps in package_imports().items():
        if within(mod, importer_prefix):
            bad = sorted(i for i in imps if forbidden(i))
            if bad:
                out[mod] = bad
    return out


def test_the_import_reader_resolves_relative_imports():
    p = PACKAGE / "data" / "conversion" / "btcv.py"
    assert "nnunetv2_fedkd.data.conversion.common" in imports_of(p)


def test_nothing_imports_the_workflows():
    bad = {m: [i for i in imps if within(i, "nnunetv2_fedkd.workflows")]
           for m, imps in package_imports().items() if not within(m, "nnunetv2_fedkd.workflows")}
    assert not {m: v for m, v in bad.items() if v}


@pytest.mark.parametrize("prefix", ["nnunetv2_fedkd.trainers", "nnunetv2_fedkd.distillation",
                                    "nnunetv2_fedkd.federated", "nnunetv2_fedkd.flower", "nnunetv2_fedkd.workflows"])
def test_data_knows_no_training(prefix):
    assert not offenders("nnunetv2_fedkd.data", lambda i: within(i, prefix))


def test_losses_are_pure_torch():
    allowed = ("torch", "typing", "__future__", "math", "nnunetv2_fedkd.losses")
    assert not offenders("nnunetv2_fedkd.losses", lambda i: not any(within(i, a) for a in allowed))


@pytest.mark.parametrize("site", ["nnunetv2_fedkd.trainers", "nnunetv2_fedkd.distillation",
                                  "nnunetv2_fedkd.federated.site_side", "nnunetv2_fedkd.federated.nnunet_site",
                                  "nnunetv2_fedkd.flower.client_app", "nnunetv2_fedkd.flower.task"])
def test_site_side_never_reaches_the_server_side(site):
    server = SERVER_SIDE | {"nnunetv2_fedkd.workflows"}
    assert not offenders(site, lambda i: any(within(i, s) for s in server))
