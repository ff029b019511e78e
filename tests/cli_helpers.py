"""Running the CLI and Python scripts in-process, and checking the CLI's one-line errors."""

import io
import runpy
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from bdguard.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    """Exit code 2, exactly one `bdguard: error:` line (the last one on stderr), no traceback."""
    assert code == 2
    errors = [line for line in err.strip().splitlines() if line.startswith("bdguard: error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err


def run_python(path: Path, *argv: str) -> tuple[int | str | None, str]:
    """`python PATH ARGV...` in this process, without an interpreter's and torch's start-up: (its exit code or
    SystemExit message, what it printed)."""
    saved, sys.argv = sys.argv, [str(path), *argv]
    printed, code = io.StringIO(), 0
    try:
        with redirect_stdout(printed), redirect_stderr(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    return code, printed.getvalue()
