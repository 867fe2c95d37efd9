"""Concurrency and first-use checks of capture and load."""

import pickle
import threading

import torch
import torch.fx._lazy_graph_module as lazy
from test_lazy_copies import _Stack  # a module list the forward loops over
from torch import nn

import fxsurgery as fxs
from fxsurgery.spec import Freeze


def test_capture_leaves_torch_lazy_graph_module_flag_as_another_thread_set_it(monkeypatch):
    # torch's _use_lazy_graph_module is one flag for the process, saved and restored by each user: a capture
    # that sets it while another thread has it set otherwise leaves it at the other thread's old value
    building, built, other_done = threading.Event(), threading.Event(), threading.Event()
    real = lazy._LazyGraphModule.__init__

    def slow(self, *args, **kwargs):
        building.set()
        built.wait(10)
        real(self, *args, **kwargs)
    monkeypatch.setattr(lazy._LazyGraphModule, "__init__", slow)

    def other():
        building.wait(10)
        with lazy._use_lazy_graph_module(False):  # say, a library asking for plain GraphModules
            built.set()
            other_done.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    result = fxs.apply(model, [], example_inputs=(x,))
    other_done.set()
    thread.join()
    monkeypatch.undo()
    assert building.is_set() and lazy._use_lazy_graph_module_flag is False
    assert torch.equal(result.module(x), model(x))


def test_a_kept_class_result_is_written_as_torchscript(tmp_path):
    # save() traces a kept-class model again and scripts that trace: a lazily generated GraphModule
    # was refused by torch.jit ("method cannot be used as a value")
    torch.manual_seed(0)
    model = _Stack().eval()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [], example_inputs=(x,), keep_class=True)
    result.save(tmp_path / "o", formats=["torchscript"])
    scripted = torch.jit.load(str(tmp_path / "o" / "model.torchscript.pt"))
    assert torch.equal(scripted(x), model(x))


class _SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)
        self.b = self.a  # one module at two paths

    def forward(self, x):
        return self.b(self.lin(self.a(x)))


def test_freezing_a_module_by_its_second_path_freezes_it():
    torch.manual_seed(0)
    model = _SharedNorm().train()
    result = fxs.apply(model, [Freeze("b")], example_inputs=(torch.randn(3, 4),))
    assert {n: p.requires_grad for n, p in result.module.named_parameters()} == \
        {"a.weight": False, "a.bias": False, "lin.weight": True, "lin.bias": True}


def test_excluding_a_module_by_its_second_path_keeps_it_trainable():
    torch.manual_seed(0)
    model = _SharedNorm().train()
    result = fxs.apply(model, [Freeze("*", exclude=["b"])], example_inputs=(torch.randn(3, 4),))
    assert {n: p.requires_grad for n, p in result.module.named_parameters()} == \
        {"a.weight": True, "a.bias": True, "lin.weight": False, "lin.bias": False}


class _SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.enc2 = self.enc  # a container at two paths: its layers have two names each

    def forward(self, x):
        return self.head(self.enc2(self.enc(x)))


def test_freezing_a_container_by_its_second_path_freezes_its_layers():
    torch.manual_seed(0)
    model = _SharedBlock().eval()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [Freeze("enc2.0")], example_inputs=(x,))
    assert {n: p.requires_grad for n, p in result.module.named_parameters()} == \
        {"enc.0.weight": False, "enc.0.bias": False, "head.weight": True, "head.bias": True}
    assert torch.equal(result.module(x), model(x))


class _Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, batch):
        return {"out": self.lin(batch["x"])}


def test_a_loaded_model_taking_a_dict_pickles(tmp_path):
    torch.manual_seed(0)
    model = _Dict().eval()
    batch = {"x": torch.randn(3, 4)}
    fxs.apply(model, [], example_inputs=(batch,)).save(tmp_path / "o")
    again = pickle.loads(pickle.dumps(fxs.load(tmp_path / "o")))
    assert torch.equal(again(batch)["out"], model(batch)["out"])


def test_a_surgery_called_under_inference_mode_gives_a_model_that_trains():
    from torchvision.models import resnet18
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        result = fxs.apply(model, [Freeze("layer1")], example_inputs=(x[:1],))
        assert torch.equal(result.module(x), model(x))
    params = dict(result.module.named_parameters())
    assert not any(p.is_inference() for p in params.values())
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in params.items())
    result.module.train()(x).sum().backward()
    assert {n for n, p in params.items() if p.grad is not None} == {n for n in params if not n.startswith("layer1.")}
