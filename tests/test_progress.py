"""Progress bars: on a terminal after a delay, never when quiet or piped."""

import contextlib
import io

import pytest

import fxsurgery._progress as progress
from fxsurgery.cli import main


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def at_once(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)


def run(argv, err):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def test_a_bar_on_a_terminal(at_once, monkeypatch):
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert list(progress.bar(range(3), "transfer", total=3, unit="tensor")) == [0, 1, 2]
    assert "transfer:" in err.getvalue() and "/3 [" in err.getvalue()


def test_no_bar_when_piped_or_quiet(at_once, monkeypatch):
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    assert list(progress.bar(range(3), "transfer")) == [0, 1, 2]
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with progress.quiet():
        assert list(progress.bar(range(3), "transfer")) == [0, 1, 2]
    assert piped.getvalue() == "" and terminal.getvalue() == ""


def test_cli_quiet_silences_the_transfer_bar(at_once, tmp_path):
    argv = ["apply", "torchvision.models:resnet18", "classifier-head", "--input", "2x3x32x32", "--dry-run"]
    loud, quiet = Terminal(), Terminal()
    assert run(argv, loud)[0] == 0 and run(argv + ["--quiet"], quiet)[0] == 0
    assert "transfer" in loud.getvalue() and "tensor" in loud.getvalue()
    assert quiet.getvalue() == ""
