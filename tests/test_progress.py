"""Progress bars: on a terminal after a delay, never when quiet or piped."""

import contextlib
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
from conftest import ROOT

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


# Through a pseudo-terminal, in a process of its own: what a user at a terminal sees.

def on_terminal(code: str, size: tuple[int, int] | None = (24, 100)) -> str:
    """What a script writes to stderr when stderr is a pseudo-terminal of `size` (rows, columns);
    None leaves a fresh pseudo-terminal's size, 0 x 0, as some terminals and containers report it."""
    leader, follower = pty.openpty()
    if size is not None:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL, env=ENV)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:   # the terminal closed: the script is done
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def piped(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
LOOPS = ("import time; from fxsurgery._progress import bar, working\n"
         "for _ in bar(range(5), 'quick', total=5): time.sleep(0.2)\n"      # 1 s: under the delay
         "for _ in bar(range(5), 'slow', total=5): time.sleep(0.6)\n"       # 3 s: over it
         "with working('one step'): time.sleep(2.6)\n")


def test_bars_show_on_a_terminal_after_two_seconds_only():
    assert progress.DELAY == 2.0
    shown = on_terminal(LOOPS)
    assert "slow:" in shown and "5/5 [" in shown and "one step: 00:02" in shown
    assert "quick" not in shown          # done within the delay: no bar at all
    assert piped(LOOPS) == ""            # piped: nothing, however long


def test_a_terminal_reporting_no_size_still_gets_a_sane_bar():
    code = "import time, fxsurgery._progress as p; p.DELAY = 0\nfor _ in p.bar(range(3), 'transfer', total=3, unit='tensor'): time.sleep(0.1)\n"
    drawn = [frame for frame in on_terminal(code, size=None).split("\r") if frame.startswith("transfer:")]
    assert drawn and drawn[-1].startswith("transfer: 100%|") and "| 3/3 [" in drawn[-1]
    assert {len(frame.rstrip()) for frame in drawn} <= {progress.WIDTH, progress.WIDTH - 1}   # 80 columns, not 0


def _cli(argv) -> str:
    """A script running the CLI with bars at once (DELAY 0), for a small model."""
    return f"import sys, fxsurgery._progress as p; p.DELAY = 0\nfrom fxsurgery.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))\n"


def test_the_cli_shows_transfer_and_save_on_a_terminal_and_nothing_piped(tmp_path):
    argv = ["apply", "torchvision.models:resnet18", "classifier-head", "--input", "2x3x32x32", "--max-shard-size", "10MB", "-o"]
    shown = on_terminal(_cli(argv + [tmp_path / "shown"]))
    for bar_ in ("load model: ", "capture: ", "transfer: ", "/122 [", "write shards: ", "/5 [", "save: "):
        assert bar_ in shown
    assert len(list((tmp_path / "shown").glob("model-0000*-of-00005.safetensors"))) == 5
    assert piped(_cli(argv + [tmp_path / "piped"])) == ""
    assert on_terminal(_cli(argv + [tmp_path / "quiet", "--quiet"])) == ""


BERT = """
import transformers
def tiny_bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()
"""


def test_transformers_bars_follow_ours(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "models.py").write_text(BERT)
    (tmp_path / "freeze.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: bert.embeddings\n")
    argv = ["apply", f"{tmp_path / 'models.py'}:tiny_bert", tmp_path / "freeze.yaml", "--input", "1x16:int64", "-o"]
    # a kept transformers model is written by its own save_pretrained, which draws "Writing model shards"
    assert "Writing model shards" in on_terminal(_cli(argv + [tmp_path / "shown"]))
    assert piped(_cli(argv + [tmp_path / "piped"])) == ""
    assert (tmp_path / "piped" / "model.safetensors").is_file()
