"""The CLI under test, and the check every bad-input case makes of its output."""

from __future__ import annotations

from click.testing import CliRunner

from trtc.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words, whole_output: bool = False):
    """A non-zero exit, no traceback, and exactly one `Error` line (with whole_output, the output is
    that one line) naming each of `words`."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and (whole_output or line.startswith("Error"))]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]
