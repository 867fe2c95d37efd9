"""More first-day papercuts: a report that summarises a long run of alike tensors, ONNX outputs named after
the model's outputs, no FutureWarning from saving a transformers model, a capture bar on a terminal, a ViT's
shape error that says the value the call gave (not "Proxy(getitem_2)")."""

import fcntl
import importlib.util
import os
import pty
import struct
import subprocess
import sys
import termios
import uuid
import warnings

import pytest
import torch
import torchvision
from conftest import ROOT

import fxsurgery as fxs
from fxsurgery import Output, Replace, Rewrite


def test_a_fold_report_summarises_its_run_of_alike_tensors():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    result = fxs.apply(model, [Rewrite(fxs.FoldBatchNorm())], example_inputs=(torch.randn(1, 3, 64, 64),))
    lines = result.report.table().splitlines()
    adapted = [line for line in lines if line.startswith("  adapted")]
    assert len(adapted) == 5 and len(result.report.adapted) == 106
    assert adapted[0].startswith("  adapted     conv1.weight [64, 3, 7, 7] float32: computed by rule 1 'rewrite fold_bn")
    assert adapted[-1] == "  adapted     ... and 102 more the same way (--json lists each)"
    assert len(lines) == 14   # was 115: a line per adapted tensor
    # twin: a short run is listed in full
    small = fxs.apply(model, [Replace("fc", torch.nn.Linear(2048, 10))], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert [line.split()[1] for line in small.report.table().splitlines() if line.startswith("  ")] == [
        "fc.weight", "fc.bias", "fc.weight", "fc.bias"]


def test_onnx_outputs_are_named_after_the_model_outputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    plain = fxs.apply(model, [fxs.Freeze("conv1")], example_inputs=(x,)).save(tmp_path / "plain", formats=["onnx"])
    features = fxs.apply(model, [Output({"layer2": "c3", "layer3": "c4"})], example_inputs=(x,))
    named = features.save(tmp_path / "named", formats=["onnx"])
    assert [o.name for o in onnx.load(str(plain / "model.onnx")).graph.output] == ["output"]
    assert [o.name for o in onnx.load(str(named / "model.onnx")).graph.output] == ["c3", "c4"]


def test_saving_a_transformers_model_warns_nothing(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = transformers.BertForSequenceClassification(config).eval()
    result = fxs.apply(model, [fxs.Freeze("bert.embeddings")], example_inputs=(torch.randint(0, 100, (1, 16)),), keep_class=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.save(tmp_path / "out")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


CAPTURE = ("import torch, torchvision, fxsurgery._progress as p; p.DELAY = 0; from fxsurgery.capture import capture; "
           "capture(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),))")


def _stderr_on_a_terminal(code: str) -> str:
    """What a script writes to stderr when stderr is a pseudo-terminal."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a fresh pty is 0 columns wide
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL, env=env)
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
    proc.wait(timeout=300)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_capture_shows_a_bar_on_a_terminal_only():
    shown = _stderr_on_a_terminal(CAPTURE)
    assert "capture: " in shown and "node" in shown
    piped = subprocess.run([sys.executable, "-c", CAPTURE], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    assert piped.returncode == 0 and "capture" not in piped.stderr


def _vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=37, num_classes=10).eval()


def _message(module, x) -> str:
    with pytest.raises(AssertionError) as err:
        module(x)
    return str(err.value)


def test_a_vit_shape_error_says_the_value_not_a_proxy(tmp_path):
    model = _vit()
    result = fxs.apply(model, [Replace("heads.head", torch.nn.Linear(32, 5))], example_inputs=(torch.randn(2, 3, 32, 32),))
    result.save(tmp_path / "o")
    spec = importlib.util.spec_from_file_location(f"saved_{uuid.uuid4().hex}", tmp_path / "o" / "model.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    saved = code.Model.load(str(tmp_path / "o"))
    for bad, said in [(torch.randn(2, 3, 48, 32), "Wrong image height! Expected 32 but got 48!"),
                      (torch.randn(2, 3, 32, 40), "Wrong image width! Expected 32 but got 40!")]:
        assert _message(model, bad) == said   # the original's own words, which the result repeats
        assert _message(result.module, bad) == said and _message(saved, bad) == said


class Checked(torch.nn.Module):
    def forward(self, x):
        torch._assert(x.shape[1] == 4, f"{x.shape[1]} features (100% wrong), mean {x}")
        return x * 2


def test_a_message_built_from_a_tensor_names_it_instead():
    result = fxs.apply(Checked(), [], example_inputs=(torch.randn(2, 4),))
    # a size is formatted at call time; a tensor is not formatted on every call: its name stands in
    assert _message(result.module, torch.randn(2, 3)) == "3 features (100% wrong), mean `x`"
    assert torch.equal(result.module(torch.ones(2, 4)), torch.full((2, 4), 2.0))
