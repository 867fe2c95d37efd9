"""Other formats, replaying the weight map, and export -> load -> export."""

import json
import os

import pytest
import torch
import torchvision
from conftest import RULES, cli
from safetensors.torch import load_file, save_file
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace
from fxsurgery.capture import trace

RULE_FILE = os.path.join(RULES, "resnet-finetune.yaml")


def surgery(model, seed=5):
    torch.manual_seed(seed)  # the head a rule makes is drawn from the same seed every time
    return fxs.apply(model, [RULE_FILE], example_inputs=(torch.randn(1, 3, 64, 64),))


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("factory", ["resnet18", "mobilenet_v3_small"])
def test_formats_match_the_module(factory, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, factory)(weights=None).eval()
    result = fxs.apply(model, [Replace(nn.Dropout, nn.Identity(), optional=True),
                               Freeze("features.0", optional=True)], example_inputs=(torch.randn(1, 3, 64, 64),))
    result.save(tmp_path / "o", formats=("pt2", "onnx", "torchscript"))
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert sorted(os.listdir(tmp_path / "o")) == ["graph.json", "model.onnx", "model.pt2", "model.py", "model.safetensors",
                                                  "model.torchscript.pt", "surgery.json"]
    assert record["formats"]["pt2"]["max_abs_diff"] <= 1e-5
    assert record["formats"]["torchscript"]["max_abs_diff"] <= 1e-5
    assert record["formats"]["onnx"]["max_abs_diff"] <= 1e-4
    x = torch.randn(1, 3, 64, 64)
    result.module.eval()
    with torch.no_grad():
        want = result.module(x)
        torch.testing.assert_close(torch.export.load(str(tmp_path / "o" / "model.pt2")).module()(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "o" / "model.torchscript.pt"))(x), want, atol=1e-5, rtol=0)
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "o" / "model.onnx"))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


class Scale(nn.Module):
    def forward(self, x):
        try:  # TorchScript compiles no try/except
            return x * 2
        except RuntimeError:
            return x


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        return self.scale(x)


def test_a_format_that_fails_says_why_and_writes_nothing(tmp_path):
    gm = trace(Scaled(), leaf_types=(Scale,)).gm
    with pytest.raises(fxs.SaveError) as err:
        fxs.save(gm, tmp_path / "o", formats=("torchscript",), example_inputs=(torch.randn(4),))
    assert str(err.value).startswith("cannot write torchscript: ")
    assert str(err.value).endswith("; fix: save without --format torchscript, or make that part traceable")
    assert not (tmp_path / "o").exists()
    with pytest.raises(fxs.SaveError) as err:
        fxs.save(gm, tmp_path / "o", formats=("pt2",))
    assert str(err.value) == "cannot write pt2 without example inputs; fix: pass example_inputs (--input)"


def test_map_weights_replays_the_surgery_on_another_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = torchvision.models.resnet18(weights=None).eval()
    result = surgery(first)
    result.save(tmp_path / "o")
    torch.manual_seed(1)
    later = torchvision.models.resnet18(weights=None).eval()  # another checkpoint of the same architecture
    mapped = fxs.map_weights(later.state_dict(), tmp_path / "o")
    module = fxs.load(tmp_path / "o").eval()
    module.load_state_dict(mapped, strict=True)
    direct = surgery(later).module.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(module(x), direct(x))
    assert torch.equal(mapped["layer1.0.conv1.weight"], later.layer1[0].conv1.weight)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_map_weights_cli_strips_wrapper_prefixes(tmp_path, prefix):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    surgery(model).save(tmp_path / "o")
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    code, stdout, _ = cli("map-weights", tmp_path / "ckpt.safetensors", tmp_path / "o", "-o", tmp_path / "new.safetensors")
    assert code == 0 and stdout == f"wrote {tmp_path / 'new.safetensors'}: 122 tensors in the layout of {tmp_path / 'o'}\n"
    mapped = load_file(str(tmp_path / "new.safetensors"))
    assert torch.equal(mapped["conv1.weight"], model.conv1.weight)
    fxs.load(tmp_path / "o").load_state_dict(mapped, strict=True)


def test_a_partial_prefix_is_an_error(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    surgery(model).save(tmp_path / "o")
    state = {("module." + k if k.startswith("layer") else k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    code, _, stderr = cli("map-weights", tmp_path / "ckpt.safetensors", tmp_path / "o", "-o", tmp_path / "new.safetensors")
    assert code == 2
    keys = list(load_file(str(tmp_path / "ckpt.safetensors")))
    wrapped = [k for k in keys if k.startswith("module.")]
    bare = [k for k in keys if not k.startswith("module.")]
    assert (len(wrapped), len(bare)) == (114, 8)  # 19 layer* modules' tensors vs conv1, bn1 (5), fc (2)
    assert stderr == (f"fxsurgery: error: {tmp_path / 'ckpt.safetensors'}: 114 keys start with 'module.' ({wrapped[0]}, ...) "
                      f"but 8 do not ({bare[0]}, ...); fix: save the weights of one model, unwrapped\n")
    assert not (tmp_path / "new.safetensors").exists()


def test_export_load_export_is_identical(tmp_path):
    torch.manual_seed(0)
    result = surgery(torchvision.models.resnet18(weights=None))
    result.save(tmp_path / "a")
    fxs.save(fxs.load(tmp_path / "a"), tmp_path / "b")
    for name in ("model.py", "model.safetensors", "graph.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "class Model(nn.Module):\n    _fxsurgery_class = 'ResNet'" in (tmp_path / "b" / "model.py").read_text()


@pytest.mark.parametrize("name", ["hf/gpt2", "hf/bert", "hf/t5"])
def test_transformers_round_trip_in_a_python_without_fxsurgery(name, tmp_path):
    """A transformers model, traced as it is called, saved with a new head frozen below it,
    reloads in a separate process where importing fxsurgery fails, with identical outputs."""
    import subprocess
    import sys

    from corpus import BY_NAME
    case = BY_NAME[name]
    model = case.build()
    inputs = case.inputs()
    rules = [Freeze("*", exclude=[case.head] if case.head else [])]
    if case.head:
        rules.insert(0, Replace(case.head, fxs.new(nn.Linear, out_features=11)))
    result = fxs.apply(model, rules, example_inputs=inputs, keep_class=False)
    result.save(tmp_path / "o")
    with torch.no_grad():
        want = case.output(result.module(*inputs))
    save_file({"want": want.contiguous(), **{f"in{i}": x for i, x in enumerate(inputs) if x is not None}},
              str(tmp_path / "io.safetensors"))
    slots = [f"io['in{i}']" if x is not None else "None" for i, x in enumerate(inputs)]
    script = (
        "import sys; sys.modules['fxsurgery'] = None\n"
        "import torch; from safetensors.torch import load_file\n"
        f"sys.path.insert(0, {str(tmp_path / 'o')!r}); from model import Model\n"
        f"m = Model.load({str(tmp_path / 'o')!r}).eval(); io = load_file({str(tmp_path / 'io.safetensors')!r})\n"
        f"out = m({', '.join(slots)})\n"
        "got = out.logits if hasattr(out, 'logits') else out.last_hidden_state\n"
        "assert torch.equal(got, io['want']); print('identical')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout == "identical\n", proc.stderr[-2000:]
    if name == "hf/gpt2":
        data = fxs.load(tmp_path / "o")  # graph.json holds the call form too: nothing from the directory runs
        with torch.no_grad():
            assert torch.equal(case.output(data(*inputs)), want)
        loaded = fxs.load(tmp_path / "o", trust_code=True)
        for module in (data, loaded):
            assert module.transformer.wte.weight is not module.lm_head.weight  # the new head is its own tensor


def test_a_tied_language_model_keeps_its_tie_through_surgery_and_save(tmp_path):
    from corpus import BY_NAME
    case = BY_NAME["hf/gpt2"]
    model = case.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    result = fxs.apply(model, [Freeze("transformer.h.*")], example_inputs=case.inputs(), keep_class=False)
    m = result.module
    assert m.get_parameter("lm_head.weight") is m.get_parameter("transformer.wte.weight")
    assert result.report.entry("lm_head.weight").source == "lm_head.weight"
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o", trust_code=True)  # called through an adapter: model.py, read and trusted
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert record["ties"] == {"lm_head.weight": "transformer.wte.weight"}
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    before = loaded.lm_head.weight.detach().clone()
    loaded(*case.inputs()).logits.sum().backward()
    opt.step()
    assert torch.equal(loaded.lm_head.weight, before.add(loaded.lm_head.weight.grad, alpha=-0.1))  # updated once
