"""What used to end in an internal error (exit 3) or a false success is a one-line error with a fix.

- Weights streamed with `weights=` would bypass a model's own state-dict
  loading code (`_load_from_state_dict` overrides, load_state_dict pre-hooks):
  such a model is refused, naming the module and the reason.
- Old-style `torch.nn.utils.weight_norm`, complex YAML keys, a full disk while
  saving, a model reference that exits the process.
"""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import save_file
from test_bad_inputs import run_cli
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace


class Renamed(nn.Module):
    """A layer renamed in a later version: a pre-hook maps the old checkpoint key to the new one."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self._register_load_state_dict_pre_hook(self._rename)

    @staticmethod
    def _rename(state, prefix, *args):
        if prefix + "dense.weight" in state:
            state[prefix + "proj.weight"] = state.pop(prefix + "dense.weight")
            state[prefix + "proj.bias"] = state.pop(prefix + "dense.bias")

    def forward(self, x):
        return self.proj(x)


class Scaled(nn.Linear):
    """Stores its weight halved: its own loading code doubles it back."""

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        if prefix + "weight" in state:
            state[prefix + "weight"] = state[prefix + "weight"] * 2
        super()._load_from_state_dict(state, prefix, *args, **kwargs)


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("block, why", [
    (Renamed, "has a load_state_dict pre-hook (Renamed._rename)"),
    (lambda: Scaled(4, 4), "overrides _load_from_state_dict (Scaled._load_from_state_dict)"),
])
def test_streamed_weights_refuse_a_model_with_its_own_loading_code(tmp_path, block, why):
    torch.manual_seed(0)
    model = Net(block())
    # Renamed's hook acts on a checkpoint of the old layout; Scaled's code changes every checkpoint
    old = {k.replace("block.proj.", "block.dense.") if isinstance(model.block, Renamed) else k: v.contiguous()
           for k, v in model.state_dict().items()}
    save_file(old, str(tmp_path / "w.safetensors"))
    with fxs.empty_weights():
        empty = Net(block())
    with pytest.raises(fxs.TransferError) as err:
        fxs.apply(empty, [Freeze("head")], example_inputs=(torch.randn(1, 4),), weights=tmp_path / "w.safetensors")
    assert str(err.value) == (f"weights=: block ({type(empty.block).__name__}) {why}, which reading the checkpoint tensor "
                              "by tensor would bypass; fix: build the model, load the checkpoint with "
                              "model.load_state_dict, and apply without weights= (--weights)")
    # its own loading code still works, and a surgery on the loaded model is exact
    model.load_state_dict(model.state_dict())
    result = fxs.apply(model, [Freeze("head")], example_inputs=(torch.randn(1, 4),))
    x = torch.randn(3, 4)
    assert torch.equal(result.module(x), model(x))


def test_loading_code_that_leaves_the_checkpoint_as_it_is_is_not_refused(tmp_path):
    """A hook renaming old keys does nothing to a checkpoint in today's layout (torchvision's ViT MLPBlock
    and FrozenBatchNorm2d are such): that checkpoint streams, equal to load_state_dict."""
    from torchvision.models.vision_transformer import VisionTransformer
    from torchvision.ops.misc import FrozenBatchNorm2d
    for build in (lambda: Net(Renamed()),
                  lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
                  lambda: nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))):
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(2, 4) if isinstance(model, Net) else torch.randn(2, 3, 32, 32)
        model(x)  # materialises the lazy layer
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
        with fxs.empty_weights():
            empty = build().eval()
        if not isinstance(empty, (Net, VisionTransformer)):
            empty[3] = nn.Linear(4 * 30 * 30, 2)
        for stream in (False, True):
            result = fxs.apply(empty, [], example_inputs=(x[:1],), weights=tmp_path / "w.safetensors", stream=stream)
            if stream:
                result.save(tmp_path / "o", force=True)
                got = fxs.load(tmp_path / "o")
            else:
                got = result.module
            assert torch.equal(got.eval()(x), model(x)), (type(model).__name__, stream)


def test_torch_own_loading_code_is_not_refused(tmp_path):
    """BatchNorm overrides _load_from_state_dict (old checkpoints without num_batches_tracked): still streamed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with fxs.empty_weights():
        empty = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    result = fxs.apply(empty, [Freeze("0")], example_inputs=(torch.randn(2, 4),), weights=tmp_path / "w.safetensors")
    x = torch.randn(3, 4)
    assert torch.equal(result.module.eval()(x), model(x))


class OldNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.utils.weight_norm(nn.Linear(4, 4))

    def forward(self, x):
        return self.fc(x)


def test_old_style_weight_norm_is_refused_with_the_fix():
    with pytest.warns(FutureWarning):
        model = OldNorm()
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(model, [Replace("fc", nn.Identity())], example_inputs=(torch.randn(1, 4),))
    assert str(err.value) == ("fc: uses torch.nn.utils.weight_norm, whose weight a hook recomputes before each call; "
                              "fix: use torch.nn.utils.parametrizations.weight_norm, or call "
                              "torch.nn.utils.remove_weight_norm(model.fc) first")


def test_a_model_pruned_with_torch_nn_utils_prune_is_refused_with_the_fix():
    # its weight is weight_orig * weight_mask, made by a hook: the copy failed in torch's deepcopy with a raw RuntimeError
    import torchvision
    from torch.nn.utils import prune
    model = torchvision.models.resnet18().eval()
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.3)
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(model, [fxs.Freeze("layer2")], example_inputs=(torch.randn(1, 3, 32, 32),))
    assert str(err.value) == ("layer1.0.conv1: uses torch.nn.utils.prune, whose weight a hook recomputes before each call; fix: call "
                              "torch.nn.utils.prune.remove(model.get_submodule('layer1.0.conv1'), 'weight') first (the pruned weight stays, as a "
                              "tensor of its own)")
    prune.remove(model.layer1[0].conv1, "weight")  # as the fix says
    result = fxs.apply(model, [fxs.Freeze("layer2")], example_inputs=(torch.randn(1, 3, 32, 32),))
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(result.module(x), model(x))


def test_complex_yaml_keys_are_a_rule_error(tmp_path):
    (tmp_path / "r.yaml").write_text("fxsurgery: 1\nrules:\n  - ? [a, b]\n    : fc\n")
    code, stdout, stderr, raised = run_cli(["check", str(tmp_path / "r.yaml")])
    assert (code, stdout, type(raised)) == (2, "", fxs.RuleError)
    assert stderr == (f"fxsurgery: error: {tmp_path / 'r.yaml'}:3: a key must be text, not a list; "
                      "fix: write the key as a plain word\n")


def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import fxsurgery.export._shards as saving  # where the weights are written

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving, "write_file", full)  # the writer (and save_file, for dtypes it leaves to it)
    monkeypatch.setattr(saving, "save_file", full)
    torch.manual_seed(0)
    result = fxs.apply(nn.Sequential(nn.Linear(4, 4)), [Freeze("0")], example_inputs=(torch.randn(1, 4),))
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value) == (f"{tmp_path / 'o'}: cannot write: No space left on device; "
                              "fix: free some space, or choose an output directory on another disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_model_reference_that_exits_is_an_error(tmp_path):
    (tmp_path / "r.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: '*'\n")
    code, stdout, stderr, raised = run_cli(["apply", "sys:exit", str(tmp_path / "r.yaml"), "--input", "1x4",
                                            "-o", str(tmp_path / "o")])
    assert (code, stdout, type(raised)) == (2, "", fxs.ModelError)
    assert stderr == ("fxsurgery: error: sys:exit: building the model exited the process (SystemExit: None); "
                      "fix: name a factory that returns a model\n")
    assert not (tmp_path / "o").exists()


class ReadsItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.sum()  # the line the warning names


def test_a_replaced_module_whose_tensor_the_forward_reads_is_a_warning_naming_the_line():
    import inspect

    from fxsurgery.pipeline import SurgeryWarning
    torch.manual_seed(0)
    rule = Replace("fc", fxs.new(nn.Linear, out_features=4))
    with pytest.warns(SurgeryWarning) as caught:
        fxs.apply(ReadsItsWeight(), [rule], example_inputs=(torch.randn(1, 4),))
    lines, start = inspect.getsourcelines(ReadsItsWeight.forward)
    line = start + next(i for i, text in enumerate(lines) if "self.fc.weight" in text)
    assert [str(w.message) for w in caught] == [
        f"rule 1 'replace fc with Linear(out_features=4)' ({rule.origin}): the forward also reads fc.weight directly "
        f"(node 'fc_weight', {__file__}:{line} `return self.fc(x) + self.fc.weight.sum()  # the line the warning names`): "
        "that read is not replaced, so fc.weight keeps the replaced module's tensor; fix: make the forward call the module "
        "instead of reading its tensors, or rewrite that read too"]


def test_a_replaced_module_only_called_gives_no_such_warning():
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxs.apply(Net(nn.Linear(4, 4)), [Replace("block", fxs.new(nn.Linear, out_features=4))],
                  example_inputs=(torch.randn(1, 4),))


class Many(nn.Module):
    """A module whose size argument makes one buffer each: cheap per item, unbounded in all."""

    def __init__(self, n: int):
        super().__init__()
        for i in range(n):
            self.register_buffer(f"b{i}", torch.zeros(1))


def test_a_declared_module_that_builds_without_end_is_stopped_by_a_budget():
    # checked on the meta device, MLP(hidden_channels=[5] * 200000) took 47 s: a budget of registrations stops it
    import time
    start = time.perf_counter()
    with pytest.raises(fxs.RuleError) as err:
        fxs.new(Many, n=10_000_000)
    assert time.perf_counter() - start < 30
    assert str(err.value).endswith("test_trust_errors.Many(n=10000000) is rejected: builds more than 100000 modules, parameters "
                                   "and buffers; fix: change the arguments")
    assert fxs.new(Many, n=1000).kwargs == {"n": 1000}  # a size that fits is a rule


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16])
def test_example_inputs_the_model_itself_refuses_are_refused(dtype):
    # fake tensors let token ids through a float32 Linear: apply wrote an output that failed as the model does
    import torchvision
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.zeros(2, 4, dtype=dtype)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        model(x)
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(model, [fxs.Freeze("0")], example_inputs=(x,))
    got = str(dtype).replace("torch.", "")
    assert str(err.value) == (f"the example inputs do not fit the model: '0' (Linear) holds float32 weights and receives {got}, "
                              "which the model itself refuses; fix: pass float32 inputs (--input SIZES)")
    resnet = torchvision.models.resnet18().eval().to(torch.bfloat16)  # a bfloat16 model takes bfloat16 inputs
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(resnet, [fxs.Freeze("layer1")], example_inputs=(torch.randn(1, 3, 32, 32),))
    assert str(err.value).endswith("'conv1' (Conv2d) holds bfloat16 weights and receives float32, which the model itself refuses; "
                                   "fix: pass bfloat16 inputs (--input SIZES:bfloat16)")
    y = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    assert torch.equal(fxs.apply(resnet, [fxs.Freeze("layer1")], example_inputs=(y[:1],)).module(y), resnet(y))
