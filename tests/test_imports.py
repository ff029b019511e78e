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
