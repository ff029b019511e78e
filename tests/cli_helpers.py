"""Running the CLI in-process and checking its one-line errors, for the CLI tests."""

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
