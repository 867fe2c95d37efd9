"""Every example runs to its final assert."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py") and f != "walkthrough.py")


def test_there_are_examples():
    assert len(EXAMPLES) == 7


@pytest.mark.parametrize("name", EXAMPLES)
def test_example(name, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []  # examples leave nothing behind


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own example, as users run it
    result = namespace["result"]
    assert result.report.new == ["fc.weight", "fc.bias"]
    assert {n.split(".")[0] for n, p in result.module.named_parameters() if p.requires_grad} == {"layer4", "fc"}
    assert sorted(os.listdir(tmp_path / "out")) == ["model.py", "model.safetensors", "surgery.json"]
