"""Concurrency and first-use checks of capture, copies made ahead and load."""

import threading

import torch
import torch.fx._lazy_graph_module as lazy
from torch import nn

import fxsurgery as fxs


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
