"""The small modules rules put into opaque code, where there is no graph to edit."""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from ._fitting import fit_call


def _detach(value):
    return pytree.tree_map(lambda t: t.detach() if hasattr(t, "detach") else t, value)


class Skip(nn.Module):
    """What a deleted module becomes in opaque code: its first argument passes through."""

    def forward(self, x, *args, **kwargs):
        return x


class Call(nn.Module):
    """A function in a module's place (`Replace(nn.ReLU, F.gelu)` inside opaque code)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        kwargs.pop("inplace", None)
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


class Around(nn.Module):
    """A module with something before or after it, or gradients cut at its edges.

    `before` maps the first argument, `after` the output (the first element of a
    tuple), each called with the wrapped module's other arguments as far as its
    forward takes them; `cut_in` / `cut_out`
    detach every tensor going in / coming out (values unchanged, no gradient
    crosses). The wrapped module keeps its tensors under `module.`.
    """

    def __init__(self, module: nn.Module, before: nn.Module | None = None, after: nn.Module | None = None,
                 cut_in: bool = False, cut_out: bool = False):
        super().__init__()
        self.module = module
        self.before, self.after = before, after
        self.cut_in, self.cut_out = cut_in, cut_out

    def forward(self, *args, **kwargs):
        if self.cut_in:
            args, kwargs = _detach((args, kwargs))
        if self.before is not None:
            args = (_first(_fed(self.before, args[0], args, kwargs)),) + tuple(args[1:])
        out = self.module(*args, **kwargs)
        if self.after is not None:
            made = _fed(self.after, _first(out), args, kwargs)
            out = (_first(made), *out[1:]) if isinstance(out, tuple) else _first(made)
        return _detach(out) if self.cut_out else out

    def extra_repr(self) -> str:
        return ", ".join(f for f, on in (("cut_in", self.cut_in), ("cut_out", self.cut_out)) if on)


def _first(value):
    """A layer that returns a tuple (hidden_states, ...) passes its first element on."""
    return value[0] if isinstance(value, tuple) else value


def _fed(module: nn.Module, first, args: tuple, kwargs: dict):
    """`module` called with what the wrapped module receives, `first` in place of its first argument,
    as far as its forward takes them: an inserted decoder layer gets attention_mask, position_embeddings...
    by name; a Dropout gets `first` alone."""
    args, kwargs = fit_call(module, (first, *args[1:]), kwargs)
    return module(*args, **kwargs)


def stay_eval(module: nn.Module, args: tuple[torch.Tensor]) -> None:
    """Forward pre-hook: eval mode whatever .train() set on the layer or a block holding it."""
    module.training = False


# A function, typed, so that TorchScript compiles it with the BatchNorm it holds; model.py defines the same
# text, which `stays_eval` knows by its code, so a model loaded from model.py saves with it again.
STAY_EVAL_SOURCE = inspect.getsource(stay_eval)


class StayEval:
    """The hook as saves before `stay_eval` pickled it (kept so that they load)."""

    def __call__(self, module: nn.Module, args) -> None:
        module.training = False


def is_stay_eval(hook) -> bool:
    """`stay_eval`, or model.py's copy of it: a plain function of the same code (constants included: a user's hook
    of that name setting training = True differs only there), with no defaults or closure to change what it does."""
    if hook is stay_eval or isinstance(hook, StayEval):
        return True
    code, mine = getattr(hook, "__code__", None), stay_eval.__code__
    return (inspect.isfunction(hook) and hook.__name__ == "stay_eval" and hook.__defaults__ is None
            and hook.__kwdefaults__ is None and hook.__closure__ is None
            and all(getattr(code, a) == getattr(mine, a) for a in ("co_code", "co_consts", "co_names", "co_varnames", "co_argcount")))


def stays_eval(module: nn.Module) -> bool:
    """Freeze(..., bn="eval") holds `module` in eval mode."""
    return any(is_stay_eval(h) for h in module._forward_pre_hooks.values())


class HoldEval:
    """A deep-copy hook (applied again after a deep copy or a pickle) giving a GraphModule a `train` that puts the
    BatchNorm layers below it that Freeze(..., bn="eval") holds back in eval mode, found by path. A layer's own hook
    holds it only from its next call, and only while it is that layer: `.training` read True after `.train()`, and
    `nn.SyncBatchNorm.convert_sync_batchnorm` builds new layers without the hook, whose statistics then moved. A
    BatchNorm at a held path is held, whatever built it; model.py's `train` does the same."""

    installs = ()

    def __call__(self, gm: nn.Module) -> None:
        held = tuple(path for path, sub in gm.named_modules() if path and stays_eval(sub))
        if not held:
            return
        # torch.fx gives each GraphModule a class of its own: these are this module's, not every GraphModule's
        type(gm)._fxsurgery_stay_eval = held
        type(gm).train = _held_train
        if self not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(self)


def _held_train(self, mode: bool = True):
    super(type(self), self).train(mode)
    for path in type(self)._fxsurgery_stay_eval:
        try:
            sub = self.get_submodule(path)
        except AttributeError:  # taken out since: nothing there to hold
            continue
        if isinstance(sub, _BatchNorm):
            sub.training = False
            if not stays_eval(sub):  # a layer put in its place: held when called on its own too
                sub.register_forward_pre_hook(stay_eval)
    return self


def hold_by_path(module: nn.Module) -> None:
    """Give every GraphModule in `module` that holds BatchNorm layers in eval mode a `HoldEval`."""
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule):
            HoldEval()(sub)
