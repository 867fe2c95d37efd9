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
    torch.manual_seed(0)  # random weights: the same numbers on every run
    for code in blocks:  # the README's own examples, in order, as users run them
        exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.report.new == ["fc.weight", "fc.bias"]
    assert {n.split(".")[0] for n, p in result.module.named_parameters() if p.requires_grad} == {"layer4", "fc"}
    assert sorted(os.listdir(tmp_path / "out")) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]
    general = namespace["general"]
    assert general.mode == "regenerated graph module" and general.specialised == {}
    ids = torch.randint(0, 100, (1, 1))  # a length of 1: its branch computes the same there, so its guard lets it through
    assert torch.equal(general.module.eval()(ids).logits, general.capture.model.eval()(ids).logits)  # (`bert` is another later)
    kept = namespace["kept"]
    assert kept.mode == "kept class LlamaForCausalLM" and kept.module.config.num_hidden_layers == 6
    assert kept.report.entry("model.layers.3.mlp.up_proj.weight").source == "model.layers.1.mlp.up_proj.weight"
    assert (tmp_path / "llama-out" / "config.json").is_file()
    trimmed, lora = namespace["trimmed"], namespace["lora"]
    assert (trimmed.module.config.vocab_size, trimmed.module.config.num_hidden_layers) == (50, 2)
    assert trimmed.module.lm_head.weight.shape == (50, 32) and namespace["tokens"].shape == (1, 8)
    assert sum(p.numel() for p in lora.trainable_parameters()) == 3584
    folded, tuned = namespace["folded"], namespace["tuned"]
    assert folded.plan.matches[0].count == 53
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.module.modules())
    assert folded.report.entry("conv1.weight").op.startswith("computed by rule 1 'rewrite fold_bn")
    assert tuned.plan.matches[0].count == 24
    assert tuned.gradient_flow.status["encoder.layers.encoder_layer_0.mlp.0.weight"] == "frozen"
    assert issubclass(namespace["linear_relu"], fxs.Pattern) and namespace["GeluResidual"]().is_dag


def _first_day():
    text = open(os.path.join(ROOT, "README.md")).read()
    return text.split("## First day", 1)[1].split("\n## ", 1)[0]


def test_readme_first_day_backbone_equals_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor
    code = _first_day().split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"torch": torch, "torchvision": __import__("torchvision"), "fxs": fxs}
    exec(compile(code, "README.md", "exec"), namespace)
    maps, pyramid, backbone = namespace["maps"], namespace["pyramid"], namespace["backbone"]
    reference = create_feature_extractor(backbone, return_nodes={"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    with torch.no_grad():
        want = reference(namespace["images"])
    assert list(maps) == ["c3", "c4", "c5"] and all(torch.equal(maps[k], want[k]) for k in want)
    assert [tuple(v.shape) for v in pyramid.values()] == [(2, 256, 28, 28), (2, 256, 14, 14), (2, 256, 7, 7)]
    assert namespace["features"].report.dropped == ["fc.weight", "fc.bias"]


def test_readme_first_day_transformers_classifier_from_the_cli(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from conftest import cli
    section = _first_day()
    for block in section.split("```python\n")[2:] + section.split("```yaml\n")[1:]:
        body = block.split("```", 1)[0]
        name = body.splitlines()[0].lstrip("# ").split(":")[0]   # each file's first line names it
        (tmp_path / name).write_text(body)
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    outputs = []
    for line in commands:
        assert line.startswith("fxsurgery ")
        code, stdout, stderr = cli(*line.split()[1:])
        assert code == 0, stderr
        outputs.append(stdout)
    assert "classifier" in outputs[0] and "Linear" in outputs[0]
    assert outputs[1].rstrip().splitlines()[-1] == "wrote bert-out/ (config.json, model.safetensors, surgery.json)"
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert-out")
    assert model.config.num_labels == 3 and sorted(model.config.id2label) == [0, 1, 2]
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 100, (2, 16))).logits.shape == (2, 3)
    # every backbone tensor transferred, the head new, the old head dropped
    assert "total       41           0        2    2        0" in outputs[1]
