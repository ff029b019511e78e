import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bdguard


@pytest.mark.parametrize(
    "module",
    [
        "bdguard.attacks.surrogate",
        "bdguard.training",
        "bdguard.attacks.iad",
        "bdguard.defenses.vab",
        "bdguard.defenses.pruning",
        "bdguard.defenses.neural_cleanse",
        "bdguard.runs.analyze",
        "bdguard.analysis.gradcam",
        "bdguard.runs.repair",
        "bdguard.runs.detect",
        "bdguard.detectors",
        "bdguard.attacks.store",
        "bdguard.bench",
        "bdguard.reporting.html",
    ],
)
def test_each_package_imports_first_without_a_cycle(module):
    # a fresh interpreter: an import cycle only shows when the module is the first one loaded
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_new_file_in_a_registry_package_registers_itself(tmp_path, monkeypatch):
    """What makes a new attack, defense, detector, data set or model one file: the package imports all its modules."""
    package = tmp_path / "plugins"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from bdguard.registry import Registry, import_modules\n"
        "THINGS = Registry('thing')\n"
        "import_modules(__name__, __path__)\n"
    )
    (package / "newcomer.py").write_text(
        "from plugins import THINGS\n\n\n@THINGS.register\nclass Newcomer:\n    name = 'newcomer'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = importlib.import_module("plugins")
    assert plugins.THINGS.names() == ["newcomer"] and plugins.THINGS.get("newcomer").__name__ == "Newcomer"


# docs/design.md's layout, bottom up: a package may import only packages of its own layer or below; the ground floor's
# modules are layered too (errors first: everything may raise a BdguardError)
LAYERS = [
    {"errors", "stats"},
    {"config", "io", "registry", "distributed"},
    {"hashing", "progress", "plotting", "results"},
    {"data"},
    {"models"},
    {"training"},
    {"attacks"},
    {"analysis"},
    {"reporting"},
    {"defenses"},
    {"detectors"},
    {"runs"},
    {"bench", "api"},
    {"cli", "__main__"},
]


def test_every_import_points_down_the_layers():
    root = Path(bdguard.__file__).parent
    layer = {name: depth for depth, names in enumerate(LAYERS) for name in names}
    upward = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts == ("__init__",):
            continue
        package = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            for imported in _bdguard_packages(node):
                if layer[imported] > layer[package]:
                    upward.append(f"{'/'.join(parts)} imports bdguard.{imported}")
    assert not upward, upward


def _bdguard_packages(node: ast.AST) -> list[str]:
    """The bdguard packages an import statement reads, in any of its forms: `from bdguard.X import ...`, `from
    bdguard import X`, `import bdguard.X`."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "bdguard":
        return [alias.name for alias in node.names if alias.name != "__version__"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bdguard."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bdguard.")]
    return []


def test_the_layer_check_sees_every_form_of_import():
    forms = ["from bdguard.cli import main", "from bdguard import cli", "import bdguard.cli.main as m"]
    assert [_bdguard_packages(ast.parse(text).body[0]) for text in forms] == [["cli"], ["cli"], ["cli"]]
    assert _bdguard_packages(ast.parse("from bdguard import __version__").body[0]) == []


def test_no_two_public_functions_or_classes_share_a_name():
    """A name says what a thing does: two public `collect`s or `stamp`s in two modules are one concept written twice
    or two concepts named alike."""
    root = Path(bdguard.__file__).parent
    homes: dict[str, list[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                homes.setdefault(node.name, []).append(str(path.relative_to(root)))
    assert not {name: where for name, where in homes.items() if len(where) > 1}
