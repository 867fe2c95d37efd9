"""Modes stay live: what the original decides from self.training, the result decides at run time."""

import copy
import importlib.util
import pickle
import uuid

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import transformers
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze
from fxsurgery.capture import ModeGraphModule


class TrainEval(nn.Module):
    """Branches on self.training as torch.fx's own _TrainEvalModel does: 101 in train mode, 0 in eval."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if self.training:
            return self.fc(x) * 0 + 101
        return self.fc(x) * 0


class Drops(nn.Module):
    """Dropout written as functions of self.training (constants in a traced graph)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = F.dropout(self.fc(x), 0.5, self.training)
        q = x.view(2, 1, 4, 8)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.25 if self.training else 0.0)


def _import_model_py(directory):
    """model.py as a user imports it: by path, no fxsurgery involved."""
    spec = importlib.util.spec_from_file_location(f"saved_{uuid.uuid4().hex}", directory / "model.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code.Model.load(str(directory))


def _same_in_train(original, module, *inputs, seed=1):
    """Outputs in train mode from the same random state."""
    original.train(), module.train()
    torch.manual_seed(seed)
    expected = original(*inputs)
    torch.manual_seed(seed)
    return expected, module(*inputs)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]


@pytest.mark.parametrize("captured_in", ["train", "eval"])
def test_branches_on_training_follow_the_mode(captured_in, tmp_path):
    torch.manual_seed(0)
    model = TrainEval().train(captured_in == "train")
    x = torch.ones(1, 3)
    result = fxs.apply(model, [], example_inputs=(x,))
    assert isinstance(result.module, ModeGraphModule)
    assert torch.equal(result.module.eval()(x), torch.zeros(1, 3))
    assert torch.equal(result.module.train()(x), torch.full((1, 3), 101.0))
    assert model.training == (captured_in == "train")  # the user's model keeps its mode
    copied = copy.deepcopy(result.module)
    assert torch.equal(copied.eval()(x), torch.zeros(1, 3)) and torch.equal(copied.train()(x), torch.full((1, 3), 101.0))
    result.save(tmp_path / "o")
    saved = _import_model_py(tmp_path / "o")
    assert torch.equal(saved.eval()(x), torch.zeros(1, 3))
    assert torch.equal(saved.train()(x), torch.full((1, 3), 101.0))
    result.module.eval()
    result.save(tmp_path / "ts", formats=("torchscript",))  # a format records one mode: the current one
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    assert torch.equal(scripted(x), torch.zeros(1, 3))
    data = fxs.load(tmp_path / "o")  # graph.json holds both graphs: loaded as data, each mode runs its own
    assert torch.equal(data.eval()(x), torch.zeros(1, 3)) and torch.equal(data.train()(x), torch.full((1, 3), 101.0))
    again = fxs.load(tmp_path / "o", trust_code=True)
    fxs.save(again.train(), tmp_path / "again")  # a loaded model with a forward per mode saves as it was
    assert (tmp_path / "again" / "model.py").read_text() == (tmp_path / "o" / "model.py").read_text().replace(
        f"self.train({captured_in == 'train'})", "self.train(True)")


def test_dropout_constants_read_the_mode(tmp_path):
    torch.manual_seed(0)
    model = Drops().train()
    x = torch.randn(8, 8)
    result = fxs.apply(model, [], example_inputs=(x,))
    code = result.module.code
    assert "training = self.training" in code and "training * 0.25" in code and "training = training" in code
    assert torch.equal(result.module.eval()(x), model.eval()(x))
    expected, got = _same_in_train(model, result.module, x)
    assert torch.equal(got, expected)
    result.save(tmp_path / "o")
    saved = _import_model_py(tmp_path / "o")
    assert torch.equal(saved.eval()(x), model.eval()(x))
    expected, got = _same_in_train(model, saved, x)
    assert torch.equal(got, expected)


def test_nothing_read_from_the_mode_leaves_the_graph_alone(resnet18):
    resnet18.train()  # BatchNorm and Dropout modules are called, so their own mode decides: nothing to add
    result = fxs.apply(resnet18, [], example_inputs=(torch.randn(2, 3, 32, 32),))
    assert type(result.module).__mro__[1] is torch.fx.GraphModule
    assert not any(n.op == "get_attr" and n.target == "training" for n in result.module.graph.nodes)
    assert "training" not in result.module.code


def test_timm_dropout_and_drop_path_follow_the_mode(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", drop_rate=0.5, drop_path_rate=0.2, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Freeze("conv1")], example_inputs=(x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model was not run in train mode
    assert isinstance(result.module, ModeGraphModule)  # timm's drop_path returns early in eval mode: two graphs
    assert not result.module.get_parameter("conv1.0.weight").requires_grad
    assert torch.equal(result.module.eval()(x), model.eval()(x))
    expected, got = _same_in_train(model, result.module, x)
    assert torch.equal(got, expected)
    model.eval(), result.module.eval()
    result.save(tmp_path / "o")
    saved = _import_model_py(tmp_path / "o")
    assert torch.equal(saved.eval()(x), model(x))
    expected, got = _same_in_train(model, saved, x)
    assert torch.equal(got, expected)


def test_timm_dropout_only_is_one_graph():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", drop_rate=0.5, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Freeze("conv1")], example_inputs=(x,))
    assert not isinstance(result.module, ModeGraphModule)
    assert [n.kwargs["training"].name for n in result.module.graph.nodes if n.target is F.dropout] == ["training"]
    assert torch.equal(result.module.eval()(x), model.eval()(x))
    expected, got = _same_in_train(model, result.module, x)
    assert torch.equal(got, expected)


def test_swin_stochastic_depth_and_attention_dropout():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10, dropout=0.1, attention_dropout=0.1)
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(model, [], example_inputs=(x,))
    live = [n for n in result.module.graph.nodes if any(getattr(a, "name", None) == "training" for a in
                                                        [*n.args, *n.kwargs.values()])]
    assert {n.target.__name__ for n in live} == {"stochastic_depth", "shifted_window_attention"}
    assert torch.equal(result.module.eval()(x), model.eval()(x))
    expected, got = _same_in_train(model, result.module, x)
    assert torch.equal(got, expected)


def test_bert_attention_dropout_follows_the_mode(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                     attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 100, (2, 8))
    result = fxs.apply(model, [], example_inputs=(ids,))
    model.eval(), result.module.eval()
    first, second = _logits(result.module(ids)), _logits(result.module(ids))
    assert torch.equal(first, second) and torch.equal(first, model(ids).logits)
    expected, got = _same_in_train(model, result.module, ids)
    assert torch.equal(_logits(got), expected.logits)
    torch.manual_seed(2)
    assert not torch.equal(_logits(result.module(ids)), expected.logits)  # train mode does drop


def test_frozen_batchnorm_stays_eval_in_both_graphs(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", drop_rate=0.5, drop_path_rate=0.2, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Freeze("*", exclude=["fc"], bn="eval")], example_inputs=(x,))
    module = result.module.train()
    stats = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    reference = copy.deepcopy(model).train()
    for sub in reference.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.eval()
    torch.manual_seed(3)
    expected = reference(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), expected)  # dropout and drop path train, BatchNorm stays on its statistics
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in stats.items())
    assert torch.equal(module.eval()(x), model.eval()(x))
    result.save(tmp_path / "o")
    # model.py, graph.json read as data (the default load: it lost them once) and a pickle keep them in eval mode
    for saved in (_import_model_py(tmp_path / "o"), fxs.load(tmp_path / "o"), pickle.loads(pickle.dumps(result.module))):
        saved.train()
        torch.manual_seed(3)
        assert torch.equal(saved(x), expected)
        assert not saved.get_submodule("layer1.0.bn1").training and saved.get_submodule("layer1.0").training
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in stats.items())
        for sub in saved.modules():  # a training loop may call .train() on a block, not the root
            sub.train()
        torch.manual_seed(3)
        assert torch.equal(saved(x), expected)
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in stats.items())


def test_frozen_batchnorm_scripts_and_resaves(tmp_path):
    """TorchScript compiles the hook; a model.py load saves again with its BatchNorm still held."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Freeze("*", exclude=["fc"], bn="eval")], example_inputs=(x,))
    expected = model.eval()(x)
    result.save(tmp_path / "o", formats=["torchscript"])
    scripted = torch.jit.load(str(tmp_path / "o" / "model.torchscript.pt"))
    for module in (torch.jit.script(result.module), scripted):
        module.train()
        assert torch.allclose(module(x), expected, atol=1e-5, rtol=0)
        assert not getattr(module.layer1, "0").bn1.training
    trusted = fxs.load(tmp_path / "o", trust_code=True)
    fxs.save(trusted, tmp_path / "again")
    for again in (fxs.load(tmp_path / "again"), torch.jit.script(trusted)):
        for sub in again.modules():
            sub.train()
        assert torch.allclose(again(x), expected, atol=1e-5, rtol=0)



def test_held_batchnorm_reads_eval_after_train_and_survives_sync_batchnorm(tmp_path):
    """A held BatchNorm reads training=False as soon as .train() returns, and a BatchNorm put at its path
    (nn.SyncBatchNorm.convert_sync_batchnorm builds new layers, without the layer's hook) is held too: its
    statistics moved in a DDP run before. Layers outside the Freeze still train their statistics."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Freeze("*", exclude=["layer4"], bn="eval")], example_inputs=(x,))
    reference = copy.deepcopy(model).train()
    for path, sub in reference.named_modules():
        if isinstance(sub, nn.BatchNorm2d) and not path.startswith("layer4"):
            sub.eval()
    expected = reference(x)
    result.save(tmp_path / "o")
    for made in (result.module, copy.deepcopy(result.module), pickle.loads(pickle.dumps(result.module)),
                 fxs.load(tmp_path / "o"), _import_model_py(tmp_path / "o")):
        made.train()
        assert [made.get_submodule(p).training for p in ("bn1", "layer1.0.bn2", "layer1.0", "layer4.0.bn1")] == [False, False, True, True]
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(made).train()
        assert type(synced.bn1) is nn.SyncBatchNorm and not synced.bn1.training and synced.layer4[0].bn1.training
        held, moving = synced.layer1[0].bn1.running_mean.clone(), synced.layer4[0].bn1.running_mean.clone()
        assert torch.equal(synced(x), expected)
        assert torch.equal(synced.layer1[0].bn1.running_mean, held)
        assert not torch.equal(synced.layer4[0].bn1.running_mean, moving)
    replaced = copy.deepcopy(result.module)
    replaced.bn1 = nn.Identity()  # taken out: nothing left at that path to hold
    assert replaced.train().bn1.training and not replaced.layer1[0].bn1.training


class Gate(nn.Module):
    def forward(self, x):
        return x + 1 if self.training else x * 2


class Opaque(nn.Module):
    """Data-dependent Python at the top: the model is not one graph, its child is."""

    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        return self.gate(x)


@pytest.mark.parametrize("captured_in", ["train", "eval"])
def test_branch_outside_one_graph_runs_in_its_mode_only(captured_in):
    model = Opaque().train(captured_in == "train")
    x = torch.ones(2)
    result = fxs.apply(model, [], example_inputs=(x,))
    assert result.capture.opaque == {"": result.capture.opaque[""]} and [r.path for r in result.capture.regions] == ["gate"]
    assert torch.equal(result.module(x), model(x))
    other = "eval" if captured_in == "train" else "train"
    with pytest.raises(AssertionError) as err:
        result.module.train(captured_in != "train")(x)
    assert str(err.value) == (f"'gate' was captured in {captured_in} mode and runs other code in {other} mode (from "
                              f"node '{'add' if captured_in == 'train' else 'mul'}'), inside a model that is not one "
                              "graph; capture the model again in the mode you run it in")


def test_mode_read_of_a_module_in_another_mode_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), Drops()).train()
    model[1].eval()
    with pytest.raises(fxs.ModeError) as err:
        fxs.apply(model, [], example_inputs=(torch.randn(8, 8),))
    assert str(err.value) == ("'Sequential' at node 'dropout': reads self.training of a module in another mode than "
                              "the model; fix: call model.train() or model.eval() before the surgery")


@pytest.mark.parametrize("make", [Drops, TrainEval])
def test_a_result_operated_on_again_keeps_its_modes(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(8, 8) if make is Drops else torch.ones(1, 3)
    first = fxs.apply(model, [Freeze("fc")], example_inputs=(x,)).module
    again = fxs.apply(first, [fxs.Replace("fc", nn.Identity())], example_inputs=(x,)).module
    direct = fxs.apply(model, [fxs.Replace("fc", nn.Identity())], example_inputs=(x,)).module
    assert torch.equal(again.eval()(x), direct.eval()(x))
    expected, got = _same_in_train(direct, again, x)
    assert torch.equal(got, expected)


def test_a_directory_loaded_as_data_keeps_the_mode_live(tmp_path):
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, self.training)

    torch.manual_seed(0)
    model, x = Dropping().train(), torch.randn(2, 4)
    fxs.apply(model, [Freeze("fc")], example_inputs=(x,)).save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")   # graph.json, no model.py imported
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
        torch.manual_seed(1)
        dropped = loaded.train()(x)
        torch.manual_seed(1)
        assert torch.equal(dropped, model.train()(x)) and not torch.equal(dropped, model.eval()(x))


class Distilled(nn.Module):
    """Two heads in train mode, their mean in eval mode, behind a BatchNorm1d (which takes no batch of one
    in train mode)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.head, self.dist = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.fc(x))
        if self.training:
            return self.head(y), self.dist(y)
        return (self.head(y) + self.dist(y)) / 2


def test_the_other_mode_is_captured_on_a_batch_of_two_where_one_fails():
    torch.manual_seed(0)
    model = Distilled().eval()
    result = fxs.apply(model, [Freeze("fc")], example_inputs=(torch.randn(1, 4),))
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4)
    assert torch.equal(result.module(x), reference(x))
    result.module.train()
    reference.train()
    for got, want in zip(result.module(x), reference(x)):
        assert torch.equal(got, want)
    assert torch.equal(result.module.get_submodule("bn").running_mean, reference.bn.running_mean)


class _TiedAux(nn.Module):
    """An auxiliary head, called in train mode only, that shares its weight with the head both modes call."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.aux.weight = self.head.weight

    def forward(self, x):
        h = self.body(x)
        y = self.head(h)
        if self.training:
            y = y + self.aux(h.flip(-1))
        return y


def test_a_tie_between_a_train_only_module_and_a_shared_one_stays_one_tensor():
    torch.manual_seed(0)
    model = _TiedAux().eval()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [], example_inputs=(x,))
    module = result.module
    assert isinstance(module, ModeGraphModule)
    assert module.get_submodule("aux").weight is module.get_submodule("head").weight
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in model.named_parameters()]
    reference = copy.deepcopy(model).train()
    module.train()
    for net, params in ((reference, reference.parameters()), (module, result.trainable_parameters())):
        optimizer = torch.optim.SGD(params, lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    assert torch.equal(module.eval()(x), reference.eval()(x))


def test_parameters_only_train_mode_uses_are_trainable():
    # googlenet's auxiliary heads run in train mode only: captured in eval mode they are in the other graph
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=True, init_weights=True, num_classes=10).eval()
    result = fxs.apply(model, [Freeze("conv1")], example_inputs=(torch.randn(2, 3, 64, 64),))
    aux = {n for n, p in result.module.named_parameters() if n.startswith(("aux1.", "aux2."))}
    assert len(aux) == 14 and result.gradient_flow.method == "graphs of both modes"
    assert {n for n in aux if result.gradient_flow.status[n] == "trainable"} == aux
    names = {id(p): n for n, p in result.module.named_parameters()}
    assert aux <= {names[id(p)] for p in result.trainable_parameters()}
    assert aux <= {names[id(p)] for group in result.param_groups(lr=0.1) for p in group["params"]}
    assert {n for n, s in result.gradient_flow.status.items() if s == "cut"} == set()


def test_tensors_only_the_other_mode_reads_are_reported_as_in_the_result(tmp_path):
    """timm's BatchNormAct2d counts num_batches_tracked in training only: captured in eval mode, the eval graph
    never reads it, the train graph the result also runs does. The report said 34 'dropped' that the result holds."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    result = fxs.apply(model, [Freeze("blocks.0")], example_inputs=(torch.randn(2, 3, 64, 64),))
    assert isinstance(result.module, ModeGraphModule)
    state = result.module.state_dict()
    listed = [e.name for e in result.report.entries if e.status != "dropped"]
    assert sorted(listed) == sorted(state) and result.report.dropped == []
    entry = result.report.entry("blocks.0.0.bn1.num_batches_tracked")
    assert (entry.status, entry.source) == ("transferred", "blocks.0.0.bn1.num_batches_tracked")
    assert torch.equal(state["blocks.0.0.bn1.num_batches_tracked"], model.state_dict()["blocks.0.0.bn1.num_batches_tracked"])
    result.module.train()(torch.randn(2, 3, 64, 64))
    assert int(result.module.state_dict()["bn1.num_batches_tracked"]) == 1  # counted where the train graph runs


def test_a_new_head_of_a_two_graph_model_is_reported_once_and_the_old_one_dropped():
    """timm's MobileNetV3 runs a graph per mode; its new `classifier` has the old one's name: taking in the other
    mode's report listed the new head twice and the old one nowhere."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    result = fxs.apply(model, [fxs.Replace("classifier", fxs.new(nn.Linear, out_features=7))],
                       example_inputs=(torch.randn(2, 3, 64, 64),))
    assert isinstance(result.module, ModeGraphModule)
    assert result.report.new == ["classifier.weight", "classifier.bias"]
    assert result.report.dropped == ["classifier.weight", "classifier.bias"]
    assert sorted(e.name for e in result.report.entries if e.status != "dropped") == sorted(result.module.state_dict())


def stay_eval(module, args):
    """Use batch statistics."""
    module.training = True


def test_a_user_hook_named_like_ours_is_not_taken_for_it(tmp_path):
    # the same bytecode as fxsurgery's stay_eval but another constant: it was saved as a BatchNorm held in eval mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    model[1].register_forward_pre_hook(stay_eval)
    result = fxs.apply(model, [Freeze("0")], example_inputs=(torch.randn(8, 4),))
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value).startswith("1: run hooks registered on the model, which model.py and graph.json do not rebuild")
    assert not (tmp_path / "o").exists()
