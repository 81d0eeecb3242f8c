"""The code's shape, as the design asks it: short functions, stages apart, private Ray APIs in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("training", "tune")
MAX_FUNCTION_LINES = 60
# Private Ray (and Optuna) APIs: leading-underscore modules, attributes and keyword arguments.
PRIVATE_API = re.compile(r"ray\._private|autoscaler\._private|\b_ot_study|\b_ot_trials|\b_generator_backpressure|\b_node_ip_address|\b_temp_dir\b|\bENABLE_RAY_CLUSTER\b")


def sources(*packages: str):
    for package in packages:
        yield from sorted((REPO / package).rglob("*.py"))


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_private_ray_apis_only_in_the_compat_module():
    compat = REPO / "training" / "infra" / "compat.py"
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sources(*PACKAGES, "benchmarks") if p != compat
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE_API.search(line)]
    assert not offenders, offenders


def test_stages_do_not_import_each_other():
    kfold = [p for p in sources("training") if "stages" in p.parts]
    assert kfold
    for path in kfold:
        assert not {m for m in imports(path) if m == "tune" or m.startswith("tune.")}, path
    for path in sources("tune"):
        assert not {m for m in imports(path) if m.startswith("training.stages")}, path


def test_a_stage_uses_another_stage_only_through_its_package():
    """The pseudo-label rounds run the k-fold through training.stages.kfold's exports, never its modules."""
    stages = REPO / "training" / "stages"
    for path in sorted(stages.rglob("*.py")):
        own = path.relative_to(stages).parts[0]
        for module in imports(path):
            parts = module.split(".")
            if parts[:2] == ["training", "stages"] and len(parts) > 2 and parts[2] != own:
                assert len(parts) == 3, f"{path.relative_to(REPO)} imports {module}: use training.stages.{parts[2]}'s exports"
    pseudo = imports(stages / "pseudo_label" / "stage.py")
    assert "training.stages.kfold" in pseudo  # the rule above is not vacuous


@pytest.mark.parametrize("module", ["training.config", "training.modeling.registry"])
def test_config_does_not_import_modeling_implementations(module):
    path = REPO / (module.replace(".", "/") + ".py")
    assert not {m for m in imports(path) if m in ("training.modeling.models", "training.modeling.losses")}, path


def test_library_below_the_stages_does_not_import_ray():
    library = [p for p in sources("training") if not {"stages", "infra"} & set(p.parts)]
    for path in library:
        assert not {m for m in imports(path) if m == "ray" or m.startswith("ray.")}, path
