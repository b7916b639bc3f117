"""CLI test helpers shared by the first-hour tests: run the Click app in-process and check that a
result exited with the expected code, said the expected words and showed no traceback."""

from click.testing import CliRunner

from gensample.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def clean(res, code, *msgs):
    assert res.exit_code == code, res.output
    for m in msgs:
        assert m in res.output, res.output
    assert "Traceback" not in res.output
    if res.exception is not None:
        assert isinstance(res.exception, SystemExit), repr(res.exception)
