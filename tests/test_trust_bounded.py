"""Bounded: checking a rule file allocates nothing it declares; --set values stay small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_bad_inputs import run_cli

import fxsurgery as fxs

ROOT = Path(__file__).resolve().parent.parent
BIG = "fxsurgery: 1\nrules:\n  - insert: {after: fc, module: torch.nn.Embedding, num_embeddings: 250000, embedding_dim: 1000}\n"


def test_checking_a_rule_file_builds_its_modules_on_the_meta_device(tmp_path):
    """117 bytes of YAML declaring Embedding(250000, 1000): 1 GB if built, a few MB when checked on meta."""
    (tmp_path / "big.yaml").write_text(BIG)
    assert len(BIG) == 117
    script = ("import resource, sys, torch, torchvision\nfrom fxsurgery.spec import load_rules\n"
              "a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nload_rules(sys.argv[1])\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - a) // 1024)")
    grown = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.yaml")], capture_output=True, text=True,
                           check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert int(grown) < 100, f"checking the file grew the process by {grown} MB"


def test_set_refuses_yaml_aliases(tmp_path):
    (tmp_path / "r.yaml").write_text(BIG)
    code, stdout, stderr, raised = run_cli(["check", str(tmp_path / "r.yaml"), "--set", "n=[&a [1, 2], *a, *a]"])
    message = "--set 'n=[&a [1, 2], *a, *a]': aliases (*name) are not allowed; fix: write the value itself"
    assert (code, stdout, stderr) == (2, "", f"fxsurgery: error: {message}\n") and type(raised) is fxs.RuleError


def test_set_refuses_a_mapping(tmp_path):
    (tmp_path / "r.yaml").write_text(BIG)
    code, stdout, stderr, raised = run_cli(["check", str(tmp_path / "r.yaml"), "--set", "n={a: 1}"])
    message = "--set 'n={a: 1}': a param takes a number, text or a list, not a mapping; fix: e.g. --set num_classes=37"
    assert (code, stdout, stderr) == (2, "", f"fxsurgery: error: {message}\n") and type(raised) is fxs.RuleError


def test_set_still_reads_scalars_lists_and_text():
    from fxsurgery.spec import parse_overrides
    assert parse_overrides(["a=37", "b=[1, 2]", "c=text", "d=: x", "e="]) == {"a": 37, "b": [1, 2], "c": "text", "d": ": x", "e": ""}


# -- every error message is one line of at most 300 characters ------------------------------------

def _shape_of_a_bounded_message(message: str, starts: str, fix: str) -> None:
    assert len(message) <= 300 and "\n" not in message
    assert message.startswith(starts) and message.endswith(fix) and "..." in message


def test_a_huge_rule_selector_gives_a_bounded_message_with_its_fix_whole():
    import torch
    from torch import nn
    huge = "layer." + "x" * 5000
    with __import__("pytest").raises(fxs.MatchError) as err:
        fxs.apply(nn.Sequential(nn.Linear(4, 4)), [fxs.Replace(huge, nn.Identity())], example_inputs=(torch.randn(1, 4),))
    message = str(err.value)
    assert message == err.value.message
    _shape_of_a_bounded_message(message, "rule 1 'replace layer.xxx", "; fix: " + message.split("; fix: ")[1])
    assert len(message.split("; fix: ")[1]) > 20  # the fix is there, not cut away


def test_a_huge_path_on_the_command_line_gives_a_bounded_line(tmp_path):
    path = str(tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / "rules.yaml")
    code, stdout, stderr, raised = run_cli(["check", path])
    assert (code, stdout) == (2, "") and stderr.count("\n") == 1
    line = stderr.removeprefix("fxsurgery: error: ").rstrip("\n")
    _shape_of_a_bounded_message(line, str(tmp_path)[:20], "; fix: check the path")
    assert line == raised.message


def test_a_message_spread_over_lines_becomes_one():
    err = fxs.RuleError("first\nsecond\r\nthird; fix: do it")
    assert str(err) == "first second third; fix: do it"


def test_control_characters_in_a_message_are_shown_escaped():
    err = fxs.RuleError("weights: no tensor 'a\x1b[31mred\x00' in x.safetensors; fix: check the name")
    assert str(err) == "weights: no tensor 'a\\x1b[31mred\\x00' in x.safetensors; fix: check the name"
    assert str(err).isprintable() and fxs.RuleError("caf\u00e9: ok; fix: none").message == "caf\u00e9: ok; fix: none"


def test_short_messages_are_left_alone():
    text = "r.yaml:3: unknown key 'foo'; fix: use one of replace, delete"
    assert fxs.RuleError(text).message == text
    assert fxs.RuleError("x" * 299 + ";").message == "x" * 299 + ";"


HEAD = "fxsurgery: 1\nrules:\n  - replace: fc\n    with: {module: torch.nn.Linear, out_features: 250000}\n"
SMALL = "fxsurgery: 1\nrules:\n  - replace: fc\n    with: {module: torch.nn.Linear, out_features: 10}\n"


def _dry_run_growth(tmp_path, text: str) -> tuple[int, str]:
    """MB the process grew while `apply --dry-run` ran with this rule file, and what it printed."""
    rules = tmp_path / f"r{len(text)}.yaml"
    rules.write_text(text)
    script = ("import contextlib, io, resource, sys\nfrom fxsurgery.cli import main\nimport torchvision\n"
              "a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nout = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n    code = main(['apply', 'torchvision.models:resnet18', sys.argv[1], "
              "'--input', '2x3x32x32', '--eval', '--dry-run'])\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - a) // 1024, code)\nprint(out.getvalue())")
    done = subprocess.run([sys.executable, "-c", script, str(rules)], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    first, _, printed = done.partition("\n")
    grown, code = first.split()
    assert code == "0", printed
    return int(grown), printed


def test_a_dry_run_builds_declared_modules_on_the_meta_device(tmp_path):
    """A head of 250000 classes is 512 MB built; a dry run shows it without allocating it."""
    huge, printed = _dry_run_growth(tmp_path, HEAD)
    small, _ = _dry_run_growth(tmp_path, SMALL)
    assert "new         fc.weight [250000, 512] float32: made by rule 1" in printed and "dry run: nothing written" in printed
    assert huge - small < 100, f"the declared head grew the dry run by {huge - small} MB more than a small one"
