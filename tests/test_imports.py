import importlib
import subprocess
import sys

import pytest


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
