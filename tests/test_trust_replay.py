"""map-weights reproduces every tensor apply adapted, bit for bit, or refuses saying why.

Each test applies rules to one checkpoint, saves, then maps a second
checkpoint of the same architecture through the saved directory and compares
the mapped tensors bitwise with what apply computes from that second
checkpoint directly.
"""

from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import RULES, rehash
from safetensors.torch import load_file, save_file
from test_bad_inputs import run_cli
from torch import nn

import fxsurgery as fxs
from fxsurgery import Replace, Rewrite


class Head(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.bn2 = nn.BatchNorm2d(2, affine=False)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with other values everywhere, BatchNorm statistics included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model.eval()


def _bitwise(mapped: dict, direct: nn.Module) -> None:
    want = direct.state_dict()
    assert sorted(mapped) == sorted(want)
    for name, t in want.items():
        assert mapped[name].dtype == t.dtype, name
        assert torch.equal(mapped[name], t), name


def _replayed(model_factory, rules, inputs, tmp_path, seed=7):
    """(mapped, direct): the second checkpoint mapped through the save of the first, and apply on the second."""
    first = _randomised(model_factory(), 1)
    torch.manual_seed(seed)
    fxs.apply(first, rules, example_inputs=inputs).save(tmp_path / "o")
    second = _randomised(model_factory(), 2)
    torch.manual_seed(seed)
    direct = fxs.apply(second, rules, example_inputs=inputs).module
    save_file({k: v.contiguous() for k, v in second.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    code, stdout, stderr, raised = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"),
                                            "-o", str(tmp_path / "mapped.safetensors")])
    assert (code, stderr) == (0, ""), raised
    return load_file(str(tmp_path / "mapped.safetensors")), direct


@pytest.mark.parametrize("classes", [3, 5])
def test_a_row_selection_is_replayed_permuted(tmp_path, classes):
    """[2, 0, 1] of 3 rows keeps the shape: copied unpermuted, it would pass every shape check."""
    factory = lambda: Head(classes)  # noqa: E731
    mapped, direct = _replayed(factory, [Replace("fc", fxs.new(nn.Linear, out_features=3), weights={"select": [2, 0, 1]})],
                               (torch.randn(2, 4),), tmp_path)
    second = _randomised(factory(), 2)
    assert torch.equal(mapped["fc.weight"], second.fc.weight[[2, 0, 1]])
    _bitwise(mapped, direct)


@pytest.mark.parametrize("policy", ["slice", "pad"])
def test_slice_and_pad_are_replayed(tmp_path, policy):
    out = 3 if policy == "slice" else 8
    mapped, direct = _replayed(Head, [Replace("fc", fxs.new(nn.Linear, out_features=out), weights=policy)],
                               (torch.randn(2, 4),), tmp_path)
    _bitwise(mapped, direct)


def test_folded_batchnorms_are_recomputed_from_the_checkpoint(tmp_path):
    mapped, direct = _replayed(ConvNet, [Rewrite(fxs.FoldBatchNorm())], (torch.randn(1, 3, 8, 8),), tmp_path)
    assert sorted(mapped) == ["conv.bias", "conv.weight", "conv2.bias", "conv2.weight"]
    _bitwise(mapped, direct)


def test_a_folded_resnet_maps_bit_for_bit(tmp_path):
    factory = lambda: torchvision.models.resnet18(weights=None, num_classes=10)  # noqa: E731
    mapped, direct = _replayed(factory, [str(Path(RULES) / "fold-bn.yaml")], (torch.randn(1, 3, 32, 32),), tmp_path)
    _bitwise(mapped, direct)


def test_input_channel_adaptation_is_replayed(tmp_path):
    factory = lambda: torchvision.models.resnet18(weights=None, num_classes=10)  # noqa: E731
    rules = [Rewrite(fxs.AdaptInputChannels(in_channels=1))]
    mapped, direct = _replayed(factory, rules, (torch.randn(1, 3, 32, 32),), tmp_path)
    second = _randomised(factory(), 2)
    assert torch.equal(mapped["conv1.weight"], second.conv1.weight.sum(dim=1, keepdim=True))
    _bitwise(mapped, direct)


def test_input_channels_by_a_weights_policy_are_replayed(tmp_path):
    rules = [Replace("body", fxs.new(nn.Linear, in_features=6, out_features=6), weights="adapt_input_channels")]
    mapped, direct = _replayed(Head, rules, (torch.randn(2, 4),), tmp_path)
    _bitwise(mapped, direct)


class Scaled(fxs.Pattern):
    """A user pattern: its maths lives in Python map-weights does not have."""

    pattern = (nn.Linear,)

    def rewrite(self, linear):
        made = nn.Linear(linear.in_features, linear.out_features)
        with torch.no_grad():
            made.weight.copy_(linear.weight * 2)
            made.bias.copy_(linear.bias)
        return made


def test_a_tensor_a_user_pattern_computed_is_refused_with_the_reason(tmp_path):
    model = _randomised(Head(), 1)
    rule = Rewrite(Scaled(), select="fc")
    fxs.apply(model, [rule], example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(_randomised(Head(), 2).state_dict(), tmp_path / "o")
    assert str(err.value) == (f"fc.weight is computed by rule 1 'rewrite Scaled in fc' ({rule.origin}) from fc, which map-weights cannot "
                              "recompute (only weights policies and built-in patterns replay); fix: apply the rules "
                              "again with --weights CHECKPOINT")


def test_a_cast_is_refused_like_weights_refuses_it(tmp_path):
    model = _randomised(Head(), 1)
    fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=3), weights={"select": [2, 0, 1]})],
              example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    half = {k: v.half().contiguous() for k, v in _randomised(Head(), 2).state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    code, stdout, stderr, raised = run_cli(["map-weights", str(tmp_path / "half.safetensors"), str(tmp_path / "o"),
                                            "-o", str(tmp_path / "m.safetensors")])
    assert code == 2 and type(raised) is fxs.SaveError
    assert stderr == ("fxsurgery: error: the checkpoint's 'body.weight' is float16, the surgery read float32; "
                      "fix: pass a float32 checkpoint (map-weights casts nothing, as --weights does not)\n")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(fxs.SaveError, match="the checkpoint's 'fc.weight' is float16, the surgery read float32"):
        fxs.map_weights({**_randomised(Head(), 2).state_dict(), "fc.weight": half["fc.weight"]}, tmp_path / "o")


def test_the_source_of_an_adapted_tensor_is_checked_by_its_own_shape(tmp_path):
    model = _randomised(Head(), 1)
    fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=3), weights="slice")],
              example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    state = {**_randomised(Head(), 2).state_dict(), "fc.weight": torch.zeros(3, 6)}
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(state, tmp_path / "o")
    assert str(err.value) == ("the checkpoint's 'fc.weight' has shape [3, 6], the surgery read [5, 6]; "
                              "fix: pass a checkpoint of the original architecture")


@pytest.mark.parametrize("tamper", [
    lambda r: r["fc.weight"].update(op="unknown"),
    lambda r: r["fc.weight"].update(policy={"select": [99, 0, 1]}),
    lambda r: r["fc.weight"].update(reads=["src"]),
])
def test_a_tampered_recipe_is_a_one_line_error(tmp_path, tamper):
    import json
    model = _randomised(Head(), 1)
    fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=3), weights={"select": [2, 0, 1]})],
              example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    tamper(record["report"]["recipes"])
    (tmp_path / "o" / "surgery.json").write_text(json.dumps(record))
    rehash(tmp_path / "o")  # as a writer that sealed its edit would: the recipe is still checked
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(_randomised(Head(), 2).state_dict(), tmp_path / "o")
    assert str(err.value).startswith(f"{tmp_path / 'o' / 'surgery.json'}: cannot replay fc.weight (")
    assert str(err.value).endswith("); fix: write the directory again with save()")


@pytest.mark.parametrize("tamper, found", [
    (lambda r: r.pop("report"), "KeyError: 'report'"),
    (lambda r: r["report"]["entries"][0].pop("op"), "KeyError: 'op'"),
    (lambda r: r["report"].update(entries=[7]), "AttributeError: 'int' object has no attribute 'get'"),
])
def test_a_tampered_record_is_a_one_line_error(tmp_path, tamper, found):
    import json
    fxs.apply(_randomised(Head(), 1), [fxs.Freeze("body")], example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    tamper(record)
    (tmp_path / "o" / "surgery.json").write_text(json.dumps(record))
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(_randomised(Head(), 2).state_dict(), tmp_path / "o")
    assert str(err.value) == (f"{tmp_path / 'o' / 'surgery.json'}: not a record map-weights can read ({found}); "
                              "fix: write the directory again with save()")


def test_a_pruned_surgery_maps_another_checkpoint_by_the_indices_it_kept(tmp_path):
    """Prune slices every coupled tensor; map-weights keeps the same indices of another checkpoint."""
    rules = [fxs.Prune("layer1.0.conv1", channels=[0, 5, 7]), fxs.Prune("layer3.1.conv2", channels=[1, 2, 200])]
    inputs = (torch.randn(1, 3, 64, 64),)
    torch.manual_seed(0)
    first, second = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
    fxs.apply(first, rules, example_inputs=inputs).save(tmp_path / "o")
    mapped = fxs.map_weights(second.state_dict(), tmp_path / "o")
    expected = fxs.apply(second, rules, example_inputs=inputs).module.state_dict()
    assert sorted(mapped) == sorted(expected)
    assert [k for k in expected if not torch.equal(mapped[k], expected[k])] == []
    assert tuple(mapped["layer3.1.bn2.weight"].shape) == (253,)


def test_mapped_weights_reach_the_disk_before_they_take_their_name(tmp_path, monkeypatch):
    """The file is fsynced, then renamed into place, then its directory fsynced: a crash leaves old or new."""
    import os

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    _replayed(lambda: Head(3), [Replace("fc", fxs.new(nn.Linear, out_features=3), weights={"select": [2, 0, 1]})],
              (torch.randn(2, 4),), tmp_path)
    # written in a marked temp directory beside it (a kill leaves it for the next run to remove), then renamed
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/\.mapped\.safetensors\.fxsurgery-tmp-[0-9a-f]{{16}}/mapped\.safetensors", synced[-2])
    assert synced[-1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "mapped.safetensors", "o"]


def test_map_weights_replaces_its_output_with_force_and_only_a_file(tmp_path):
    """A second map-weights to the same -o said "already exists" with no way to replace it."""
    mapped, _ = _replayed(lambda: Head(3), [Replace("fc", fxs.new(nn.Linear, out_features=3), weights={"select": [2, 0, 1]})],
                          (torch.randn(2, 4),), tmp_path)
    mapped = {k: v.tolist() for k, v in mapped.items()}  # before the file under it is replaced
    out = tmp_path / "mapped.safetensors"
    save_file({"stale": torch.zeros(1)}, str(out))
    stale = out.read_bytes()
    args = ["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"), "-o", str(out)]
    code, _, stderr, _ = run_cli(args)
    assert (code, stderr) == (2, f"fxsurgery: error: {out}: already exists; fix: choose another output file or pass --force "
                                 "(force=True)\n") and out.read_bytes() == stale
    assert run_cli([*args, "--force"])[:3] == (0, f"wrote {out}: {len(mapped)} tensors in the layout of {tmp_path / 'o'}\n", "")
    assert {k: v.tolist() for k, v in load_file(str(out)).items()} == mapped
    out.unlink()
    out.mkdir()  # a directory of that name is not replaced
    code, _, stderr, _ = run_cli([*args, "--force"])
    assert (code, stderr) == (2, f"fxsurgery: error: {out}: is not a regular file, which --force replaces; fix: choose another "
                                 "output file\n") and out.is_dir()


def test_map_weights_refuses_an_output_name_other_than_safetensors(tmp_path):
    """-o mapped.pt wrote safetensors bytes under a name torch.load then fails on."""
    from conftest import cli
    code, stdout, stderr = cli("map-weights", tmp_path / "ckpt.safetensors", tmp_path / "o", "-o", tmp_path / "mapped.pt")
    assert (code, stdout, sorted(p.name for p in tmp_path.iterdir())) == (2, "", [])
    assert stderr == (f"fxsurgery: error: {tmp_path / 'mapped.pt'}: map-weights writes safetensors; fix: name the output "
                      "*.safetensors, e.g. mapped.safetensors\n")


@pytest.mark.parametrize("keep_class", [True, False])
@pytest.mark.parametrize("kept", ["lm_head.weight", "model.embed_tokens.weight"])
def test_a_tied_checkpoint_that_keeps_one_name_maps_and_so_does_a_save_pretrained_surgery(tmp_path, keep_class, kept):
    """safetensors.save_model keeps lm_head.weight of a tied Llama, save_pretrained model.embed_tokens.weight:
    map-weights refused either ("has no ..."), and refused a save_pretrained surgery as "not an fxsurgery output"."""
    transformers = pytest.importorskip("transformers")
    import shutil
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=50, tie_word_embeddings=True, use_cache=False)
    ids = torch.randint(0, 50, (1, 6))
    rules = [fxs.Freeze("model.layers.0.*")]
    fxs.apply(_randomised(transformers.LlamaForCausalLM(config), 1), rules, example_inputs=(ids,),
              keep_class=keep_class).save(tmp_path / "o")
    second = _randomised(transformers.LlamaForCausalLM(config), 2)
    direct = fxs.apply(second, rules, example_inputs=(ids,), keep_class=keep_class).module
    drop = ({"lm_head.weight", "model.embed_tokens.weight"} - {kept}) | {"model.rotary_emb.inv_freq"}
    save_file({k: v.contiguous() for k, v in second.state_dict().items() if k not in drop}, str(tmp_path / "ckpt.safetensors"))
    code, stdout, stderr, raised = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"),
                                            "-o", str(tmp_path / "mapped.safetensors")])
    assert (code, stderr) == (0, ""), raised
    mapped, want = load_file(str(tmp_path / "mapped.safetensors")), direct.state_dict()
    assert sorted(mapped) == sorted(set(want) - {"lm_head.weight"})   # the alias, as save_pretrained drops it
    assert all(torch.equal(mapped[k], want[k]) for k in mapped)
    assert torch.equal(mapped["model.embed_tokens.weight"], second.lm_head.weight)
    by_path = fxs.map_weights(tmp_path / "ckpt.safetensors", tmp_path / "o")   # a file, as the command line takes it
    assert sorted(by_path) == sorted(want) and all(torch.equal(by_path[k], want[k]) for k in want)
    if keep_class:  # the surgery directory with the mapped weights is the library's own format again
        shutil.copytree(tmp_path / "o", tmp_path / "p")
        shutil.copy(tmp_path / "mapped.safetensors", tmp_path / "p" / "model.safetensors")
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "p").eval()
        assert torch.equal(loaded(ids).logits, direct(ids).logits)


def test_map_weights_refuses_a_saved_directory_changed_since_save_and_writes_with_the_umask(tmp_path):
    """map-weights copied a damaged made tensor (the one fxs.load refuses) into its output, and wrote it owner-only."""
    _replayed(lambda: Head(3), [Replace("fc", fxs.new(nn.Linear, out_features=5))], (torch.randn(2, 4),), tmp_path)
    assert (tmp_path / "mapped.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    weights = tmp_path / "o" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = torch.tensor([777.0, 777.0]).numpy().tobytes()  # the last tensor's last values
    weights.write_bytes(bytes(data))
    out = tmp_path / "again.safetensors"
    code, _, stderr, _ = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"), "-o", str(out)])
    assert (code, stderr) == (2, f"fxsurgery: error: {tmp_path / 'o'}: model.safetensors {CHANGED}\n")
    assert not out.exists()


CHANGED = "changed since it was written (hash mismatch); fix: write the directory again with save()"
RECORD_CHANGED = "surgery.json " + CHANGED  # each file's own hash tells the record from the files


def _edit_record(directory, change) -> None:
    import json
    record = json.loads((directory / "surgery.json").read_text())
    change(record)
    (directory / "surgery.json").write_text(json.dumps(record, indent=2))


def _swap_sources(record) -> None:
    for entry in record["report"]["entries"]:
        entry["source"] = {"fc1.weight": "fc2.weight", "fc2.weight": "fc1.weight"}.get(entry["name"], entry["source"])


@pytest.mark.parametrize("change, message", [
    (_swap_sources, RECORD_CHANGED),   # two same-shaped layers swapped: map-weights followed the edited record
    (lambda r: [e.update(status="new") for e in r["report"]["entries"] if e["name"] == "fc1.bias"], RECORD_CHANGED),
    (lambda r: r.update(saved_by="save_pretrained"), RECORD_CHANGED),   # skipped the hash check altogether
    (lambda r: r.update(format=1), "written by an older fxsurgery (format 1), whose hash leaves surgery.json out; fix: read it, "
                                   "load it with fxs.load(..., verify=False) and save it again"),
], ids=["sources swapped", "made new", "claims save_pretrained", "older format"])
def test_an_edited_record_is_refused_by_map_weights_and_load(tmp_path, change, message):
    """surgery.json says where each tensor comes from: the hash covers it as it covers the weights."""
    model = _randomised(nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), fc2=nn.Linear(4, 4), fc3=nn.Linear(4, 3))), 1)
    fxs.apply(model, [Replace("fc3", fxs.new(nn.Linear, out_features=5))], example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    checkpoint = _randomised(copy.deepcopy(model), 2).state_dict()
    mapped = fxs.map_weights(checkpoint, tmp_path / "o")
    assert all(torch.equal(mapped[k], checkpoint[k]) for k in ("fc1.weight", "fc2.weight", "fc1.bias"))
    _edit_record(tmp_path / "o", change)
    for call in (lambda: fxs.map_weights(checkpoint, tmp_path / "o"), lambda: fxs.load(tmp_path / "o")):
        with pytest.raises(fxs.SaveError) as err:
            call()
        assert str(err.value) == f"{tmp_path / 'o'}: {message}"
    if "format" in message:  # the way back the message gives
        fxs.save(fxs.load(tmp_path / "o", verify=False), tmp_path / "again")
        assert torch.equal(fxs.load(tmp_path / "again")(torch.ones(1, 4)), fxs.load(tmp_path / "o", verify=False)(torch.ones(1, 4)))


def test_a_save_pretrained_surgery_is_hashed_too(tmp_path):
    """Its weights are written by the library: the record's hash covers the files it lists, read back once."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=60, num_labels=2)
    model = _randomised(transformers.BertForSequenceClassification(config), 1).eval()
    ids = torch.randint(0, 60, (1, 6))
    fxs.apply(model, [fxs.Freeze("bert.embeddings.*")], example_inputs=(ids,), keep_class=True).save(tmp_path / "o")
    assert torch.equal(fxs.load(tmp_path / "o").eval()(ids).logits, model(ids).logits)
    weights = tmp_path / "o" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = torch.tensor([777.0]).numpy().tobytes()
    weights.write_bytes(bytes(data))
    message = f"{tmp_path / 'o'}: model.safetensors {CHANGED}"
    for call in (lambda: fxs.map_weights(model.state_dict(), tmp_path / "o"), lambda: fxs.load(tmp_path / "o")):
        with pytest.raises(fxs.SaveError) as err:
            call()
        assert str(err.value) == message
    _edit_record(tmp_path / "o", lambda r: r.update(files=["../o/config.json", "model.safetensors"]))
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == (f"{tmp_path / 'o' / 'surgery.json'}: lists '../o/config.json', not a file name; fix: write the "
                              "directory again with save()")


def _umask() -> int:
    import os
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_save_pretrained_directory_loads_from_its_listed_files_alone(tmp_path):
    """An adapter put beside the hashed files had from_pretrained (through peft) load other weights, unchecked."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import json
    import shutil
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=100)
    model = _randomised(transformers.LlamaForCausalLM(config), 1).eval()
    ids = torch.randint(0, 100, (1, 8))
    fxs.apply(model, [fxs.Layers("model.layers", order=[1, 0])], example_inputs=(ids,), keep_class=True).save(tmp_path / "o")
    with torch.no_grad():
        before = fxs.load(tmp_path / "o")(ids).logits
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, tmp_path / "o" / name)
    adapter = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    (tmp_path / "o" / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(tmp_path / "o")}))
    with torch.no_grad():
        assert not torch.equal(peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "o")(ids).logits, before)
        assert torch.equal(fxs.load(tmp_path / "o")(ids).logits, before)


def test_map_weights_takes_the_record_file_as_the_library_does(tmp_path):
    """fxs.map_weights took DIR/surgery.json; the command refused it as 'not an fxsurgery output'."""
    mapped, _ = _replayed(lambda: Head(3), [Replace("fc", fxs.new(nn.Linear, out_features=5))], (torch.randn(2, 4),), tmp_path)
    code, _, stderr, raised = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o" / "surgery.json"),
                                       "-o", str(tmp_path / "again.safetensors")])
    assert (code, stderr) == (0, ""), raised
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == mapped.keys() and all(torch.equal(again[k], mapped[k]) for k in mapped)


def _head_surgery(tmp_path):
    torch.manual_seed(0)
    model = Head().eval()
    fxs.apply(model, [Replace("fc", nn.Linear(6, 3))], example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    save_file(dict(model.state_dict()), str(tmp_path / "ckpt.safetensors"))
    return model


def test_a_checkpoint_with_tensors_the_original_lacks_is_refused_as_weights_refuses_it(tmp_path):
    model = _head_surgery(tmp_path)
    save_file({**model.state_dict(), "extra.weight": torch.ones(2)}, str(tmp_path / "extra.safetensors"))
    code, stdout, stderr, _ = run_cli(["map-weights", str(tmp_path / "extra.safetensors"), str(tmp_path / "o"),
                                       "-o", str(tmp_path / "m.safetensors")])
    assert (code, stdout) == (2, "")
    assert stderr == (f"fxsurgery: error: {tmp_path / 'extra.safetensors'}: does not fit the original model: unexpected 1 "
                      "(extra.weight); fix: pass weights saved from the architecture the surgery was made on\n")
    assert not (tmp_path / "m.safetensors").exists()
    # the tensors of a module the original had pass, listed or not (a folded BatchNorm's num_batches_tracked)
    assert run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"), "-o", str(tmp_path / "m.safetensors")])[0] == 0


def test_force_replaces_weights_not_another_file(tmp_path):
    _head_surgery(tmp_path)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    code, _, stderr, _ = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"), "-o", str(notes), "--force"])
    assert (code, stderr) == (2, f"fxsurgery: error: {notes}: is not a safetensors file, which --force replaces; "
                                 "fix: choose another output file\n")
    assert notes.read_text() == "my notes"
    code, _, stderr, _ = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"),
                                  "-o", str(tmp_path / "nodir" / "m.safetensors")])
    assert (code, stderr) == (2, f"fxsurgery: error: {tmp_path / 'nodir' / 'm.safetensors'}: its directory {tmp_path / 'nodir'} "
                                 "does not exist; fix: create it, or choose another output file\n")


def test_a_killed_map_weights_leaves_nothing_the_next_run_keeps(tmp_path):
    """A kill mid-write left safetensors' own temp file (.tmpXXXXXX, the output's size) beside the output for good;
    it is now written inside a marked temp directory, which the next run removes."""
    import socket
    _head_surgery(tmp_path)
    out = tmp_path / "m.safetensors"
    dead = tmp_path / ".m.safetensors.fxsurgery-tmp-0123456789abcdef"  # what a kill leaves: marked by a dead process
    dead.mkdir()
    (dead / ".fxsurgery-partial").write_text(f"999999999 {socket.gethostname()}\n")
    (dead / ".tmpAbC123").write_bytes(b"\0" * 1000)
    foreign = tmp_path / ".m.safetensors.fxsurgery-tmp-fedcba9876543210"  # unmarked and not empty: not ours to remove
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"), "-o", str(out)])[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.safetensors", "m.safetensors", "o", foreign.name])
    assert (foreign / "keep.txt").read_text() == "mine"
    assert sorted(load_file(str(out))) == ["body.bias", "body.weight", "fc.bias", "fc.weight"]


def test_mapping_through_a_prune_by_importance_says_the_channels_were_chosen_on_other_weights(tmp_path):
    """The channels an importance-ranked Prune keeps were ranked on the surgery's weights; a fine-tuned checkpoint
    mapped through it keeps those, silently (2.5 apart from pruning that checkpoint itself, on resnet18)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fxs.apply(model, fxs.load_rules("prune-half"), example_inputs=(torch.randn(1, 3, 64, 64),)).save(tmp_path / "o")
    save_file(dict(_randomised(model, 1).state_dict()), str(tmp_path / "ckpt.safetensors"))
    code, stdout, stderr, _ = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o"),
                                       "-o", str(tmp_path / "m.safetensors")])
    assert (code, stderr) == (0, "")
    assert stdout.splitlines() == [
        f"warning: prune re:layer\\d\\.\\d+\\.conv1 amount=0.5 (l1) chose its channels by importance on the weights the surgery "
        f"was made on; {tmp_path / 'ckpt.safetensors'} keeps those channels, which its own weights might not rank first; fix: "
        "apply the rules again with --weights CHECKPOINT to choose by this checkpoint, or prune by channels=",
        f"wrote {tmp_path / 'm.safetensors'}: 122 tensors in the layout of {tmp_path / 'o'}"]


def test_a_file_of_the_output_names_its_directory_in_the_fix(tmp_path):
    _head_surgery(tmp_path)
    code, _, stderr, _ = run_cli(["map-weights", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "o" / "model.py"),
                                  "-o", str(tmp_path / "m.safetensors")])
    assert (code, stderr) == (2, f"fxsurgery: error: {tmp_path / 'o' / 'model.py'}: a file, not a directory written by save(); "
                                 f"fix: pass its directory ({tmp_path / 'o'}) or its surgery.json\n")


def test_a_checkpoint_holding_something_else_than_tensors_is_named_not_the_record(tmp_path):
    # a list in the state dict read "surgery.json: not a record map-weights can read (AttributeError: ...)"
    model = _randomised(nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), fc2=nn.Linear(4, 3))), 1)
    fxs.apply(model, [Replace("fc2", fxs.new(nn.Linear, out_features=5))], example_inputs=(torch.randn(2, 4),)).save(tmp_path / "o")
    state = model.state_dict()
    state["fc1.weight"] = state["fc1.weight"].tolist()
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(state, tmp_path / "o")
    assert str(err.value) == "the checkpoint: fc1.weight is a list, not a tensor; fix: pass a state dict of tensors (model.state_dict())"
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights([1, 2], tmp_path / "o")
    assert str(err.value) == "the checkpoint: is a list, not a state dict; fix: pass model.state_dict() or a checkpoint file"
