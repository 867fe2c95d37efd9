"""A rewritten model is general in its sizes: any batch, any sequence length the code allows, any device.

Graphs guard the decisions Python made on sizes (not whole input shapes), and
tensors the forward makes take their device at run time.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_inner=37, n_positions=64,
                                     use_cache=False, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama_config():
    return transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                                    use_cache=False)


def _ids(batch, seq, seed=0):
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(value):
    if hasattr(value, "logits"):
        return value.logits
    return value[0] if isinstance(value, (tuple, list)) else value


def _same_in_both_modes(result, reference, inputs, atol=1e-5):
    """Eval outputs equal the reference's; in train mode, the same seed gives the same outputs."""
    for train in (False, True):
        result.module.train(train)
        reference.train(train)
        for x in inputs:
            torch.manual_seed(1)
            got = _out(result.module(*x))
            torch.manual_seed(1)
            want = _out(reference(*x))
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=atol), (train, [t.shape for t in x])


def _head_swapped(model, path, result):
    """The original with the result's new head in place: what the rewritten model must compute."""
    reference = copy.deepcopy(model)
    parent, _, name = path.rpartition(".")
    setattr(reference.get_submodule(parent) if parent else reference, name, result.module.get_submodule(path))
    return reference


def _small_vit():
    """torchvision's ViT code at a small size (vit_b_16 itself runs as a slow case)."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


@pytest.mark.parametrize("name", ["resnet18", "small_vit", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_torchvision_models_run_at_any_batch_size(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = (_small_vit() if name == "small_vit" else getattr(tv.models, name)()).eval()
    head = "fc" if name == "resnet18" else "heads.head"
    size = {"resnet18": 64, "small_vit": 32, "vit_b_16": 224}[name]
    result = fxs.apply(model, [Replace(head, fxs.new(nn.Linear, out_features=5)), Freeze("conv1" if name == "resnet18" else "conv_proj")],
                       example_inputs=(torch.randn(2, 3, size, size),))
    assert result.specialised == {}
    inputs = [(torch.randn(b, 3, size, size),) for b in (1, 3, 4)]
    _same_in_both_modes(result, _head_swapped(model, head, result), inputs)


def test_a_timm_model_runs_at_any_batch_size():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, drop_rate=0.5).eval()
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=4)), Freeze("conv1")],
                       example_inputs=(torch.randn(2, 3, 64, 64),))
    inputs = [(torch.randn(b, 3, 64, 64),) for b in (1, 3, 5)]
    _same_in_both_modes(result, _head_swapped(model, "fc", result), inputs)


def test_bert_as_a_graph_runs_at_any_batch_and_sequence_length():
    model = _bert()
    result = fxs.apply(model, [Replace("classifier", fxs.new(nn.Linear, out_features=5)), Freeze("bert.embeddings")],
                       example_inputs=(_ids(2, 8),), keep_class=False)
    assert result.mode == "regenerated graph module"
    _only_length_one_branches(result)
    inputs = [(_ids(b, s, seed=b + s),) for b in (1, 3, 4) for s in (1, 5, 8, 64)]  # 64: the maximum position
    _same_in_both_modes(result, _head_swapped(model, "classifier", result), inputs)
    assert "device(" not in result.module.code  # tensors the forward makes follow its inputs


def test_gpt2_as_a_graph_runs_at_any_batch_and_sequence_length():
    model = _gpt2()
    result = fxs.apply(model, [Freeze("transformer.h.0")], example_inputs=(_ids(2, 8),), keep_class=False)
    inputs = [(_ids(b, s, seed=b + s),) for b in (1, 2, 3, 5) for s in (1, 3, 8, 64)]
    _same_in_both_modes(result, model, inputs)
    assert "device(" not in result.module.code


def test_a_size_one_batch_branch_whose_outcome_is_the_same_passes_batch_one():
    """Captured at batch 2, the model's `batch_size != position_ids.shape[0]` is True; batch 1 takes the other
    branch, which computes the same there (`position_ids.expand(batch_size, -1)`): batch 1 was refused."""
    model = _gpt2()
    result = fxs.apply(model, [], example_inputs=(_ids(2, 8),), keep_class=False)
    assert result.specialised == {}
    guard = next(n.args[1] for n in result.module.graph.nodes if n.target is torch._assert and "masking_utils.py" in n.args[1])
    assert guard.startswith("'the model' was captured where `inner_transformer_wte.shape[0] != unsqueeze.shape[0]` is True "
                            "at transformers/masking_utils.py:")
    assert guard.endswith("at size 1 of dim 0 of 'input_ids', dim 1 of 'input_ids' it runs the code of sizes >= 2, checked at "
                          "capture to give the example's outputs")
    with torch.no_grad():
        assert torch.equal(_out(result.module(_ids(1, 8))), model(_ids(1, 8)).logits)


class OneDiffers(nn.Module):
    """A length of 1 takes another branch that computes something else there: no graph of the other may run it."""

    def forward(self, x):
        if x.shape[1] > 1:
            return x.cumsum(1)
        return x * 3


def test_a_size_one_branch_that_computes_otherwise_stays_refused_and_listed():
    result = fxs.apply(OneDiffers(), [], example_inputs=(torch.randn(2, 8),))
    assert list(result.specialised) == ["x"] and list(result.specialised["x"]) == [1]
    assert result.specialised["x"][1].startswith("a size of 1 takes another branch: `x.shape[1] > 1` is True at ")
    with pytest.raises(AssertionError) as err:
        result.module(torch.randn(3, 1))
    assert "`x.shape[1] > 1` is True" in str(err.value) and "this call gives another value" in str(err.value)
    x = torch.randn(3, 5)
    assert torch.equal(result.module(x), OneDiffers()(x))


class Rows(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        if x.shape[1] > 4:
            return x[:, :4] + self.table[: x.shape[0]]
        return x * 2

class Loop(nn.Module):
    def forward(self, x):
        return sum(x[i] for i in range(x.shape[0]))


def test_a_decision_on_a_size_is_guarded_with_its_condition_and_line():
    torch.manual_seed(0)
    model = Rows()
    result = fxs.apply(model, [], example_inputs=(torch.randn(3, 6),))
    for shape in ((3, 6), (5, 9), (1, 5)):
        x = torch.randn(shape)
        assert torch.equal(result.module(x), model(x))
    with pytest.raises(AssertionError) as err:
        result.module(torch.randn(3, 4))
    line = Rows.forward.__code__.co_firstlineno + 1
    assert str(err.value) == (
        f"'the model' was captured where `x.shape[1] > 4` is True at tests/test_dynamic.py:{line} (if x.shape[1] > 4:); "
        "this call gives another value, and the graph holds only the code for that one; fix: capture again with "
        "example inputs like this call's, or make the module running that line a leaf (leaf_paths=)")


def test_a_loop_over_a_size_specialises_that_dim_and_says_so():
    model = Loop()
    result = fxs.apply(model, [], example_inputs=(torch.randn(3, 5),))
    line = Loop.forward.__code__.co_firstlineno + 1
    why = f"`x.shape[0]` is 3 at tests/test_dynamic.py:{line} (return sum(x[i] for i in range(x.shape[0])))"
    assert result.specialised == {"x": {0: why}}
    assert result.to_dict()["specialised"] == {"x": {"0": why}}
    x = torch.randn(3, 7)  # dim 1 stays general
    assert torch.equal(result.module(x), model(x))
    with pytest.raises(AssertionError) as err:
        result.module(torch.randn(4, 5))
    assert str(err.value) == (
        f"'the model' was captured where {why} (it depends on dim 0 of 'x'); this call gives another value, and the "
        "graph holds only the code for that one; fix: capture again with example inputs like this call's, or make the "
        "module running that line a leaf (leaf_paths=)")


def test_a_spec_declaring_a_forced_dim_dynamic_is_refused():
    line = Loop.forward.__code__.co_firstlineno + 1
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(Loop(), [], example_inputs=(torch.randn(3, 5),), dynamic_shapes={"x": {0: "batch"}})
    assert str(err.value) == (
        f"dynamic_shapes declares dim 0 of input 'x' dynamic, but the code decides `x.shape[0]` is 3 at "
        f"tests/test_dynamic.py:{line} (return sum(x[i] for i in range(x.shape[0]))), which holds only for its example "
        "size 3; fix: leave that dim out of dynamic_shapes (it is then static), or change that line")


def test_a_spec_keeps_declared_dims_dynamic_and_the_rest_static():
    torch.manual_seed(0)
    model = Rows()
    result = fxs.apply(model, [], example_inputs=(torch.randn(3, 6),), dynamic_shapes={0: {0: torch.export.Dim("b")}})
    assert result.specialised == {"x": {1: "left out of dynamic_shapes"}}
    x = torch.randn(5, 6)
    assert torch.equal(result.module(x), model(x))
    with pytest.raises(AssertionError) as err:
        result.module(torch.randn(5, 7))
    assert str(err.value) == ("'the model': dim 1 of input 'x' is static (dynamic_shapes leaves it out) and was 6 at "
                              "capture; fix: declare it in dynamic_shapes")
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(model, [], example_inputs=(torch.randn(3, 6),), dynamic_shapes={"y": {0: "b"}})
    assert str(err.value) == ("dynamic_shapes names input 'y', which is no tensor input of the call (inputs: x); "
                              "fix: name a tensor input by position or name")


def test_a_model_captured_without_weights_runs_once_filled(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    full = transformers.LlamaForCausalLM(_llama_config()).eval()
    path = os.path.join(tmp_path, "w.safetensors")
    safetensors.save_model(full, path)
    with fxs.empty_weights():
        empty = transformers.LlamaForCausalLM(_llama_config()).eval()
    result = fxs.apply(empty, [Freeze("model.embed_tokens")], example_inputs=(_ids(2, 8),), keep_class=False,
                       weights=path)
    assert "device(" not in result.module.code and "meta" not in result.module.code
    for b, s in ((2, 8), (3, 5), (2, 64)):
        x = _ids(b, s, seed=s)
        assert torch.allclose(_out(result.module(x)), full(x).logits, atol=1e-5)


def test_saved_bert_model_py_pt2_and_onnx_take_any_batch_and_sequence_length(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _bert()
    result = fxs.apply(model, [Freeze("bert.embeddings")], example_inputs=(_ids(2, 8),), keep_class=False)
    out = result.save(tmp_path / "o", formats=("pt2", "onnx"))
    record = __import__("json").loads((out / "surgery.json").read_text())
    for fmt in ("pt2", "onnx"):
        assert record["formats"][fmt]["dynamic"] == ["dim 0 of input 0: 3", "dim 1 of input 0: 9"]
    loaded = fxs.load(out, trust_code=True)  # model.py: the call adapter is code
    program = torch.export.load(str(out / "model.pt2")).module()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch, seq in ((1, 5), (4, 5), (1, 64), (4, 64)):  # two batch sizes, two sequence lengths
        x = _ids(batch, seq, seed=seq)
        with torch.no_grad():
            want = model(x).logits
            assert torch.allclose(_out(loaded(x)), want, atol=1e-5)
            assert torch.allclose(_out(program(x)), want, atol=1e-5)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        assert torch.allclose(got, want, atol=1e-4)


def _only_length_one_branches(result):
    """Every dim stays general: a length of 1 takes another branch (sdpa's `is_causal = q_length > 1 ...`), whose
    outcome is the same at length 1 (checked at capture against the model at length 1), so its guard passes it."""
    assert result.specialised == {}
    guards = [n for n in result.module.graph.nodes if n.target is torch._assert]
    assert any("at size 1 of dim 1 of 'input_ids' it runs the code of sizes >= 2" in n.args[1] for n in guards)


def test_a_batch_of_one_exports_pt2_and_onnx_for_any_batch(tmp_path):
    # torch.export fixes a dim it traces at size 1: a dim capture left general is traced at 2
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _bert()
    result = fxs.apply(model, [Freeze("bert.embeddings")], example_inputs=(_ids(1, 8),), keep_class=False)
    _only_length_one_branches(result)
    out = result.save(tmp_path / "o", formats=("pt2", "onnx"))
    record = __import__("json").loads((out / "surgery.json").read_text())
    for fmt in ("pt2", "onnx"):
        assert record["formats"][fmt]["dynamic"] == ["dim 0 of input 0: 2", "dim 1 of input 0: 9"]
    program = torch.export.load(str(out / "model.pt2")).module()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch, seq in ((1, 8), (3, 5), (4, 64)):
        x = _ids(batch, seq, seed=seq)
        with torch.no_grad():
            want = model(x).logits
            assert torch.allclose(_out(program(x)), want, atol=1e-5)
        assert torch.allclose(torch.from_numpy(session.run(None, {name: x.numpy()})[0]), want, atol=1e-4)


def test_inspect_lists_the_dims_a_decision_specialised(tmp_path):
    from conftest import cli
    source = tmp_path / "loop.py"
    source.write_text("from torch import nn\n\n\nclass Loop(nn.Module):\n    def forward(self, x):\n"
                      "        return sum(x[i] for i in range(x.shape[0]))\n")
    code, stdout, _ = cli("inspect", f"{source}:Loop", "--input", "3x5")
    assert code == 0
    why = f"`x.shape[0]` is 3 at {tmp_path.name}/loop.py:6 (return sum(x[i] for i in range(x.shape[0])))"
    assert stdout.splitlines()[-1] == f"  specialised dim 0 of input 'x': {why}"
    code, stdout, _ = cli("inspect", f"{source}:Loop", "--input", "3x5", "--json")
    assert __import__("json").loads(stdout)["specialised"] == {"x": {"0": why}}


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_llama_config()).eval()


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_a_batch_of_one_does_not_pin_the_batch(make):
    """At batch 1 `batch_size != position_ids.shape[0]` is False (other sizes: True); captured at 1, the graph is
    captured again at 2, where the code (`position_ids.expand(batch_size, -1)`) also holds at 1."""
    model = make()
    example = _ids(1, 8)
    result = fxs.apply(model, [Freeze("lm_head")], example_inputs=(example,), keep_class=False)
    _only_length_one_branches(result)
    assert [tuple(x.shape) for x in result.example_inputs if isinstance(x, torch.Tensor)] == [(1, 8)]
    with torch.no_grad():
        assert torch.equal(_out(result.module(example)), model(example).logits)  # the example, bit for bit
    inputs = [(_ids(b, s, seed=b + s),) for b in (1, 3) for s in (5, 64)]
    _same_in_both_modes(result, model, inputs)


def test_a_batch_of_one_stays_pinned_where_the_code_needs_it():
    """`range(x.shape[0])` decides for each size: captured at 1, the batch stays specialised, and says so."""
    model = Loop()
    result = fxs.apply(model, [], example_inputs=(torch.randn(1, 5),))
    line = Loop.forward.__code__.co_firstlineno + 1
    assert result.specialised == {"x": {0: f"`x.shape[0]` is 1 at tests/test_dynamic.py:{line} "
                                          "(return sum(x[i] for i in range(x.shape[0])))"}}
    with pytest.raises(AssertionError, match="an example size of 1 takes size-1 branches"):
        result.module(torch.randn(2, 5))


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y[:, :, :4] if y.shape[2] > 4 else y


def test_a_dim_the_weights_fix_is_not_blamed_on_a_decision():
    """Probing 2 or 4 channels fails at the conv, before the decision: the channels are the weights' doing."""
    torch.manual_seed(0)
    model = Stem().eval()
    result = fxs.apply(model, [], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert result.specialised == {}
    for shape in ((1, 3, 8, 8), (3, 3, 12, 7)):
        x = torch.randn(shape)
        assert torch.equal(result.module(x), model(x))


def test_a_batch_of_one_that_takes_another_branch_runs_where_it_computes_the_same():
    """Captured at batch 2, a Llama refused batch 1 at a guard (while `specialised` said {}): that branch computes
    the same at batch 1, checked at capture, so batch 1 runs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    result = fxs.apply(model, [], example_inputs=(torch.randint(0, 100, (2, 8)),), keep_class=False)
    assert result.specialised == {}
    for shape in ((1, 8), (1, 1), (3, 5)):
        x = torch.randint(0, 100, shape)
        with torch.no_grad():
            assert torch.equal(result.module(x).logits, model(x).logits)
    assert result._static_dims() == [set()]   # exports keep it dynamic
