"""Every example runs to its final assert."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import fxsurgery as fxs

EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py") and f != "walkthrough.py")


def test_there_are_examples():
    assert EXAMPLES == ["delete_and_insert.py", "delete_first_layer.py", "detach_cut.py", "fold_for_inference.py",
                        "freeze_and_optimizer.py", "replace_first_layer.py", "resnet_new_head.py", "train_after_surgery.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example(name, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []  # examples leave nothing behind


def test_readme_python_examples_run(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks:  # the README's own examples, in order, as users run them
        exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.report.new == ["fc.weight", "fc.bias"]
    assert {n.split(".")[0] for n, p in result.module.named_parameters() if p.requires_grad} == {"layer4", "fc"}
    assert sorted(os.listdir(tmp_path / "out")) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]
    general = namespace["general"]
    assert general.specialised == {} and general.mode == "regenerated graph module"
    kept = namespace["kept"]
    assert kept.mode == "kept class LlamaForCausalLM" and kept.module.config.num_hidden_layers == 6
    assert kept.report.entry("model.layers.3.mlp.up_proj.weight").source == "model.layers.1.mlp.up_proj.weight"
    assert (tmp_path / "llama-out" / "config.json").is_file()
    folded, tuned = namespace["folded"], namespace["tuned"]
    assert folded.plan.matches[0].count == 53
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.module.modules())
    assert folded.report.entry("conv1.weight").op.startswith("computed by rule 1 'rewrite fold_bn")
    assert tuned.plan.matches[0].count == 24
    assert tuned.gradient_flow.status["encoder.layers.encoder_layer_0.mlp.0.weight"] == "frozen"
    assert issubclass(namespace["linear_relu"], fxs.Pattern) and namespace["GeluResidual"]().is_dag
