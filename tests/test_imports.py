import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bdguard

FIRST = [
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
]

# An import cycle only shows when its module is the first of the package loaded. One interpreter loads the
# third-party libraries once (importing every module named), forgets the package, and forks a child per module that
# imports it first: what a fresh interpreter per module sees, without paying torch's start-up once per module.
FORKED_FIRST_IMPORTS = """
import importlib, json, os, sys, traceback
package, modules = sys.argv[1], sys.argv[2:]
for module in modules:
    try:
        importlib.import_module(module)
    except Exception:
        pass  # its child reports it
for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
    del sys.modules[name]
found = {}
for module in modules:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            error = ""
        except BaseException:
            error = traceback.format_exc()
        os.write(write, error.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[module] = pipe.read()
    os.waitpid(child, 0)
print(json.dumps(found))
"""


def _first_imports(package: str, modules: list[str], **env: str) -> dict[str, str]:
    """Each module -> the traceback of importing it before any other module of `package` ("" when it imports)."""
    argv = [sys.executable, "-c", FORKED_FIRST_IMPORTS, package, *modules]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def first_imports() -> dict[str, str]:
    return _first_imports("bdguard", FIRST)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("module", FIRST)
def test_each_package_imports_first_without_a_cycle(first_imports, module):
    assert first_imports[module] == ""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_forked_check_sees_a_cycle_that_breaks_one_import_order_only(tmp_path):
    """a -> b -> a: importing b first works (a finds b half-made in sys.modules), importing a first fails. The
    parent imported both: its children must not find them loaded already."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\n\nB = 2\n")
    found = _first_imports("cyclic", ["cyclic.b", "cyclic.a"], PYTHONPATH=str(tmp_path))
    assert found["cyclic.b"] == "" and "ImportError: cannot import name 'A'" in found["cyclic.a"]


def test_a_command_starts_without_the_slow_libraries():
    """Every command, bench worker and torchrun rank pays bdguard's start-up: torchvision's models (which load
    torch._dynamo), SciPy, scikit-learn, matplotlib, Ray, timm and datasets are imported where they are used."""
    slow = ["torchvision", "scipy", "sklearn", "matplotlib", "ray", "timm", "datasets"]
    script = f"import sys, bdguard.cli.main; print([name for name in {slow!r} if name in sys.modules])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


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
