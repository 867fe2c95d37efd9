"""Streaming transfer: a model built on meta, its checkpoint read tensor by tensor into output shards.

Each streamed output is compared with the in-memory surgery of the same model
with its weights: the same tensors bit for bit (and, where both are written by
fxsurgery's own writer, the same shard files byte for byte).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
import torchvision
from conftest import tensors_in
from safetensors.torch import save_file

import fxsurgery as fxs
from fxsurgery import Freeze, Layers, Replace
from fxsurgery.transfer import pending_of

transformers = pytest.importorskip("transformers")

VOCAB = [3, 4, 5, 6, 7, 40, 41, 42, 90, 2]  # the rows a trimmed vocabulary keeps, in its new order


def llama_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def write_shards(state: dict, folder, parts: int):
    """A Hugging Face style sharded checkpoint, written shard by shard."""
    names = list(state)
    weight_map = {}
    for k in range(parts):
        file = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names[k::parts]}, str(folder / file))
        weight_map.update({n: file for n in names[k::parts]})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index



def test_llama_layer_deletion_vocab_trim_and_freeze_stream_as_in_memory(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    index = write_shards(model.state_dict(), tmp_path, parts=5)
    rows = {"select": VOCAB}
    rules = [Layers("model.layers", order=[0, 2, 3]),
             Replace("model.embed_tokens", fxs.new(torch.nn.Embedding, num_embeddings=len(VOCAB), embedding_dim=64), weights=rows),
             Replace("lm_head", fxs.new(torch.nn.Linear, out_features=len(VOCAB), bias=False), weights=rows),
             Freeze("model.embed_tokens")]
    ids = (torch.tensor([[1, 2, 3, 4]]),)
    reads = []
    stream = importlib.import_module("fxsurgery.transfer._stream")
    real = stream.read_block
    monkeypatch.setattr(stream, "read_block", lambda c, n, i: reads.append((n, i)) or real(c, n, i))
    with fxs.empty_weights():
        empty = transformers.LlamaForCausalLM(llama_config()).eval()
    streamed = fxs.apply(empty, rules, ids, weights=str(index), stream=True)
    # the plan on meta: nothing read but the rows the trimmed vocabulary keeps, in runs of consecutive rows
    assert [n for n, _ in reads] == ["model.embed_tokens.weight"] * 4 + ["lm_head.weight"] * 4
    assert [(i[0].start, i[0].stop) for _, i in reads[:4]] == [(3, 8), (40, 43), (90, 91), (2, 3)]
    metas = [n for n, t in streamed.module.state_dict(keep_vars=True).items() if t.is_meta]
    assert len(metas) == len(pending_of(streamed.module)) == 3 * 9 + 1  # three layers of nine tensors, the final norm
    streamed.save(tmp_path / "s", max_shard_size="30KB")
    direct = fxs.apply(model, rules, ids)
    direct.save(tmp_path / "d", max_shard_size="30KB")
    a, b = tensors_in(tmp_path / "s"), tensors_in(tmp_path / "d")
    assert a.keys() == b.keys() and len(a) == 3 * 9 + 3
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model.embed_tokens.weight"], model.model.embed_tokens.weight[VOCAB])
    assert torch.equal(a["model.layers.1.mlp.up_proj.weight"], model.model.layers[2].mlp.up_proj.weight)
    # in state-dict order with 30 kB shards: the 32 kB MLP matrices alone, five shards per layer, one more at the end
    weight_map = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {f: [n for n, g in weight_map.items() if g == f] for f in set(weight_map.values())}
    assert len(shards) == 16 and sorted(shards) == [f"model-{k:05d}-of-00016.safetensors" for k in range(1, 17)]
    assert all(sum(a[n].numel() * 4 for n in names) <= 30_000 or len(names) == 1 for names in shards.values())
    assert json.loads((tmp_path / "s" / "surgery.json").read_text())["report"]["counts"] == \
           json.loads((tmp_path / "d" / "surgery.json").read_text())["report"]["counts"]
    # (the written configuration keeps vocab_size 128 on both paths: set it for the reload)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "s", vocab_size=len(VOCAB)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(*ids).logits, direct.module(*ids).logits)


def test_a_regenerated_module_streams_into_the_same_shard_files(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    index = write_shards(model.state_dict(), tmp_path, parts=4)
    rules = [Replace("fc", fxs.new(torch.nn.Linear, out_features=4), weights="slice"), Freeze("layer1")]
    x = (torch.randn(1, 3, 32, 32),)
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(num_classes=10).eval()
    fxs.apply(empty, rules, x, weights=str(index), stream=True).save(tmp_path / "s", max_shard_size="8MB")
    fxs.apply(model, rules, x).save(tmp_path / "d", max_shard_size="8MB")
    names = sorted(os.listdir(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path / "s")) == names and "model-00009-of-00009.safetensors" in names
    for name in names:
        if name != "surgery.json":
            assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name
    assert torch.equal(fxs.load(tmp_path / "s")(x[0]), model(x[0])[:, :4])


def test_a_plan_without_weights_saves_nothing_and_formats_of_a_streamed_result_are_refused(tmp_path):
    from conftest import RULES, cli
    with fxs.empty_weights():
        empty = torchvision.models.resnet18().eval()
    plan = fxs.apply(empty, [Freeze("layer1")], (torch.randn(1, 3, 32, 32),), stream=True)
    assert plan.report.counts() == {"transferred": 122, "adapted": 0, "new": 0, "dropped": 0, "frozen": 12}
    with pytest.raises(fxs.TransferError) as err:
        plan.save(tmp_path / "o")
    assert str(err.value) == ("conv1.weight has no values (the model was built without weights) and no checkpoint was given; "
                              "fix: apply with weights= a checkpoint of the model (--weights)")
    assert os.listdir(tmp_path) == []
    code, _, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"), "--stream",
                          "-o", tmp_path / "o")
    assert (code, stderr) == (2, "fxsurgery: error: --stream reads the model's tensors from --weights, and none was given; "
                                 "fix: pass --weights (a .safetensors file or a sharded *.index.json), or --dry-run for the plan alone\n")
    model = torchvision.models.resnet18().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with fxs.empty_weights():
        empty = torchvision.models.resnet18().eval()
    x = (torch.randn(1, 3, 32, 32),)
    result = fxs.apply(empty, [Freeze("layer1")], x, weights=str(tmp_path / "w.safetensors"), stream=True)
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o", formats=["onnx"])
    assert str(err.value) == ("formats onnx: a streamed result holds no weights in memory to export; "
                              "fix: leave formats out, or apply without stream")
    assert not (tmp_path / "o").exists()


def test_dry_run_predicts_the_output_and_the_memory_of_a_plan_on_meta(tmp_path):
    from conftest import cli
    (tmp_path / "tiny.py").write_text("import transformers\n\ndef build():\n    return transformers.LlamaForCausalLM(transformers.LlamaConfig("
                                      "vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, "
                                      "num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()\n")
    (tmp_path / "drop.yaml").write_text("fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: [0, 3]\n")
    code, out, err = cli("apply", f"{tmp_path}/tiny.py:build", tmp_path / "drop.yaml", "--input", "1x8:int64", "--stream",
                         "--dry-run", "--max-shard-size", "40KB", "--json")
    assert code == 0, err
    # embed 128x64, two layers of (64x64 q, o; 32x64 k, v; three 128x64 MLP matrices; two norms of 64), norm, lm_head: float32
    layer = (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) * 4
    total = 2 * 128 * 64 * 4 + 2 * layer + 64 * 4
    footprint = json.loads(out)["footprint"]
    assert footprint["output_bytes"] == total == 361_728 and footprint["streamed"] is True
    assert footprint["predicted_peak_bytes"] == 2 * footprint["largest_shard_bytes"] + 128 * 64 * 4  # nothing else resident
    code, out, err = cli("apply", f"{tmp_path}/tiny.py:build", tmp_path / "drop.yaml", "--input", "1x8:int64", "--stream",
                         "--dry-run", "--max-shard-size", "40KB")
    assert code == 0, err
    assert out.endswith(f"output: 0.4 MB in {footprint['shards']} files (largest {footprint['largest_shard_bytes'] / 1e6:.1f} MB); "
                        f"predicted peak memory above imports: {footprint['predicted_peak_bytes'] / 1e6:.1f} MB "
                        "(streamed shard by shard)\ndry run: nothing written\n")


def test_a_dry_run_says_when_its_peak_is_more_than_this_machines_memory(tmp_path, monkeypatch):
    # a plan may be made for a bigger machine, so it is said, not refused: the run itself would be killed here
    from conftest import cli

    import fxsurgery.pipeline
    (tmp_path / "tiny.py").write_text("import torch\n\ndef build(device='cpu'):\n    with torch.device(device):\n"
                                      "        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))\n\n"
                                      "def on_meta():\n    return build('meta')\n")
    (tmp_path / "freeze.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: '0'\n")
    tail = "dry run: nothing written\n"
    monkeypatch.setattr(fxsurgery.pipeline, "machine_memory", lambda: 10_000)
    code, out, err = cli("apply", f"{tmp_path}/tiny.py:build", tmp_path / "freeze.yaml", "--input", "1x64", "--dry-run")
    # (64x64 + 64 + 8x64 + 8) x 4 bytes = 18,720 written, plus the largest shard (all of it) in memory
    assert (code, err) == (0, "")
    assert out.endswith("output: 0.0 MB in 1 file (largest 0.0 MB); predicted peak memory above imports: 0.0 MB (from memory)\n"
                        "warning: that is more than this machine's memory (0.0 MB): the run would be killed here; fix: build the "
                        "model on the meta device and stream its weights (--weights FILE --stream)\n" + tail)
    code, out, err = cli("apply", f"{tmp_path}/tiny.py:on_meta", tmp_path / "freeze.yaml", "--input", "1x64", "--dry-run", "--stream")
    assert (code, err) == (0, "")
    assert out.endswith("(streamed shard by shard)\nwarning: that is more than this machine's memory (0.0 MB): the run would be killed "
                        "here; fix: a smaller --max-shard-size (max_shard_size=), or a machine with more memory\n" + tail)
    monkeypatch.setattr(fxsurgery.pipeline, "machine_memory", lambda: 40_000)  # 2 x 18,720 = 37,440: it fits
    code, out, err = cli("apply", f"{tmp_path}/tiny.py:build", tmp_path / "freeze.yaml", "--input", "1x64", "--dry-run")
    assert (code, err, "warning" in out, out.endswith("(from memory)\n" + tail)) == (0, "", False, True)

def test_cli_streams_into_shards(tmp_path):
    from conftest import RULES, cli
    model = torchvision.models.resnet18().eval()
    index = write_shards(model.state_dict(), tmp_path, parts=4)
    rules = os.path.join(RULES, "classifier-head.yaml")
    for flag, out in (("--stream", tmp_path / "s"), (None, tmp_path / "d")):
        args = ["apply", "torchvision.models:resnet18", rules, "--input", "1x3x64x64", "--weights", index, "-o", out,
                "--max-shard-size", "20MB"] + ([flag] if flag else [])
        torch.manual_seed(0)  # the new head's initial values
        code, _, stderr = cli(*args)
        assert code == 0, stderr
    a, b = tensors_in(tmp_path / "s"), tensors_in(tmp_path / "d")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(f for f in os.listdir(tmp_path / "s") if f.startswith("model-")) == \
           [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def test_policies_read_only_what_they_use(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    index = write_shards(model.state_dict(), tmp_path, parts=4)
    conv = fxs.new(torch.nn.Conv2d, in_channels=2, out_channels=64, kernel_size=7, stride=2, padding=3, bias=False)
    rules = [Replace("conv1", conv, weights="adapt_input_channels"), Replace("fc", fxs.new(torch.nn.Linear, out_features=12),
                                                                            weights="pad")]
    x = (torch.randn(1, 3, 64, 64),)  # the original's input
    reads = []
    stream = importlib.import_module("fxsurgery.transfer._stream")
    real = stream.read_block
    monkeypatch.setattr(stream, "read_block", lambda c, n, i: reads.append((n, i)) or real(c, n, i))
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(num_classes=10).eval()
    torch.manual_seed(1)  # the padded rows keep their initial values: the same on both paths
    streamed = fxs.apply(empty, rules, x, weights=str(index), stream=True)
    # 3 -> 2 input channels uses the first two (scaled 3/2): only they are read; pad needs the whole source
    assert reads == [("conv1.weight", (slice(0, 64), slice(0, 2))), ("fc.weight", None), ("fc.bias", None)]
    streamed.save(tmp_path / "s")
    torch.manual_seed(1)
    fxs.apply(model, rules, x).save(tmp_path / "d")
    a, b = tensors_in(tmp_path / "s"), tensors_in(tmp_path / "d")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["conv1.weight"], model.conv1.weight[:, :2] * 1.5)
    assert torch.equal(a["fc.weight"][:10], model.fc.weight)


def test_pruned_rows_are_read_alone(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    index = write_shards(model.state_dict(), tmp_path, parts=4)
    rules = [fxs.Prune("layer1.0.conv1", channels=[0, 1, 2, 7, 40])]
    x = (torch.randn(1, 3, 64, 64),)
    reads = []
    stream = importlib.import_module("fxsurgery.transfer._stream")
    real = stream.read_block
    monkeypatch.setattr(stream, "read_block", lambda c, n, i: reads.append((n, i)) or real(c, n, i))
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(num_classes=10).eval()
    streamed = fxs.apply(empty, rules, x, weights=str(index), stream=True)
    streamed.save(tmp_path / "s")
    fxs.apply(model, rules, x).save(tmp_path / "d")
    a, b = tensors_in(tmp_path / "s"), tensors_in(tmp_path / "d")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["layer1.0.conv1.weight"].shape == (59, 64, 3, 3)
    # the conv's kept rows in runs (3-6, 8-39, 41-63), its BatchNorm's likewise; the next conv keeps every row
    rows = [(n, [(s[0].start, s[0].stop) for s in [i]]) for n, i in reads if i is not None]
    assert rows[0] == ("layer1.0.conv1.weight", [(3, 7)]) and len(rows) == 3 * 5


def test_a_checkpoint_keeping_one_name_of_a_tied_pair_fills_both(tmp_path):
    """safetensors' save_model keeps one name of a tied embedding and head (here lm_head.weight): weights= read
    the other name from it, in memory and streamed, instead of refusing it as missing."""
    from hf_models import llama
    from safetensors import safe_open
    from safetensors.torch import save_model
    model = llama(tie=True)
    save_model(model, str(tmp_path / "tied.safetensors"))
    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" not in f.keys() and "lm_head.weight" in f.keys()
    x = torch.randint(0, 100, (2, 6))
    for stream in (False, True):
        with fxs.empty_weights():
            empty = llama(tie=True)
        result = fxs.apply(empty, [Freeze("model.layers.0")], (torch.randint(0, 100, (1, 5)),),
                           weights=str(tmp_path / "tied.safetensors"), stream=stream)
        if stream:
            result.save(tmp_path / "out")
            got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
        else:
            got = result.module
        assert got.lm_head.weight is got.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(got(x).logits, model(x).logits)


def test_a_checkpoint_with_other_values_under_two_tied_names_is_refused(tmp_path):
    """The model ties embed_tokens and lm_head (one tensor); a file holding different values under the two names
    was read by one of them silently, where load_state_dict keeps whichever it loads last."""
    from hf_models import llama
    model = llama(tie=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "same.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, str(tmp_path / "other.safetensors"))
    with fxs.empty_weights():
        empty = llama(tie=True)
    x = torch.randint(0, 100, (1, 5))
    result = fxs.apply(empty, [Freeze("model.layers.0")], (x,), weights=str(tmp_path / "same.safetensors"))
    with torch.no_grad():
        assert torch.equal(result.module(x).logits, model(x).logits)
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(empty, [Freeze("model.layers.0")], (x,), weights=str(tmp_path / "other.safetensors"))
    assert str(err.value) == (f"{tmp_path / 'other.safetensors'}: holds different values for model.embed_tokens.weight and "
                              "lm_head.weight, which the model ties (one tensor); fix: pass weights of this model, or untie the two "
                              "in the model first")
