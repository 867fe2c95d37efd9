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
