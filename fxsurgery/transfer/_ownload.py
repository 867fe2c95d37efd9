"""A model's own loading code, which reading a checkpoint tensor by tensor bypasses.

torchvision's ViT MLPBlock, FrozenBatchNorm2d and detection heads override
`_load_from_state_dict` only to rename keys of older checkpoints; other code
converts values (a quantised layer's packing, a transposed layout). The
override is run on the checkpoint's names and shapes (meta tensors, nothing
read) by `load_state_dict(assign=True)` on a meta copy of the model: where
every tensor lands, as given, under its own name, reading tensor by tensor
gives what `load_state_dict` gives, and the model is taken; else it is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import clone
from ..errors import TransferError


def refuse_own_loading(model: nn.Module, checkpoint=None) -> None:
    """A checkpoint read tensor by tensor bypasses the code a model runs on load_state_dict
    (a pre-hook that renames old keys, a `_load_from_state_dict` that converts values):
    such a model is refused, unless that code leaves this `checkpoint` as it is (see above).
    torch's own (BatchNorm's handling of old versions) is not."""
    untouched = None  # probed once, at the first module with code of its own
    for path, sub in model.named_modules():
        why, after = None, False
        for kind, table in (("pre-hook", sub._load_state_dict_pre_hooks), ("post-hook", sub._load_state_dict_post_hooks)):
            hooks = [getattr(h, "hook", h) for h in table.values()]
            foreign = [h for h in hooks if not _from_torch(h)]
            if foreign and (why is None or kind == "post-hook"):
                why, after = f"has a load_state_dict {kind} ({_name(foreign[0])})", kind == "post-hook"
        owner = next(c for c in type(sub).__mro__ if "_load_from_state_dict" in vars(c))
        if why is None and not _from_torch(owner):
            why = f"overrides _load_from_state_dict ({owner.__qualname__}._load_from_state_dict)"
        if why is None:
            continue
        if checkpoint is not None and not after:  # a post-hook acts on the loaded module: no probe shows it
            untouched = _untouched(model, checkpoint) if untouched is None else untouched
            if untouched:
                continue
        raise TransferError(f"weights=: {path or '(the model)'} ({type(sub).__name__}) {why}, which reading the checkpoint "
                                "tensor by tensor would bypass; fix: build the model, load the checkpoint with "
                                "model.load_state_dict, and apply without weights= (--weights)")


def _from_torch(obj) -> bool:
    module = getattr(obj, "__module__", None) or getattr(getattr(obj, "__func__", None), "__module__", "") or ""
    return module == "torch" or module.startswith("torch.")


def _name(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


def _untouched(model: nn.Module, checkpoint) -> bool:
    """Whether load_state_dict(assign=True) of `checkpoint` puts each tensor, as given, under its own name
    (probed on a meta copy with meta tensors: no value is read, the model is untouched). A tensor its
    code replaced, or a name it moved, holds another storage there."""
    probe = {name: torch.empty(checkpoint.meta[file][0], dtype=checkpoint.meta[file][1], device="meta")
             for name, file in checkpoint.keys.items()}
    shell = clone(model, lambda t: t.detach().to("meta"))
    try:
        missing, unexpected = shell.load_state_dict(dict(probe), strict=False, assign=True)
    except Exception:  # its own code failed on these names: not a checkpoint it leaves alone
        return False
    if missing or unexpected:
        return False
    held = shell.state_dict(keep_vars=True)
    return all(name in held and _same_storage(held[name], t) for name, t in probe.items())


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def with_values(model: nn.Module, checkpoint) -> nn.Module:
    """A copy of `model` holding the checkpoint's values, for a rule that decides from values before the plan
    (Prune by amount ranks channels by their weights): tensors on meta get memory; the model stays as it is."""
    refuse_own_loading(model, checkpoint)
    checkpoint.check(model)
    hidden = [f"{p}.{n}" if p else n for p, m in model.named_modules() for n in m._non_persistent_buffers_set
              if getattr(m, n, None) is not None and getattr(m, n).is_meta]
    if hidden:  # not in a checkpoint, and computed when the model is built
        raise TransferError(f"{hidden[0]} is a buffer on meta that no checkpoint holds; fix: build the model inside "
                            "fxs.empty_weights(), which keeps buffers real")
    copy = clone(model, lambda t: torch.empty(t.shape, dtype=t.dtype) if t.is_meta else t.detach().clone())
    state = copy.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in checkpoint.read([n for n in state if n in checkpoint.keys]):
            state[name].copy_(value)
    return copy
