"""Hooks a user registered on the model: the root's carried to the result, all of them named where a save would lose them.

A graph is traced from the root's forward, so the root's own hooks (which
`model(x)` runs around it) are not in it, while those of the modules it traces
through are, and those of the modules it calls keep running on their copies.
"""

from __future__ import annotations

from torch import nn

from ..rewrite import is_stay_eval


def _ours(hook) -> bool:
    from . import _Consumed  # the hook a copy=False surgery puts on the original
    return is_stay_eval(hook) or isinstance(hook, _Consumed)


def carry_root_hooks(original: nn.Module, module: nn.Module, reshaped: str = "") -> list[str]:
    """Register the original root's forward and backward hooks on the result's root, in their order; the
    warnings worth giving (`reshaped`: the rule that changed the model's inputs or outputs, which they see)."""
    said = []
    if reshaped and any(not _ours(h) for h in [*original._forward_pre_hooks.values(), *original._forward_hooks.values()]):
        said.append(f"{reshaped} changes what the model takes or returns, and the hooks registered on the model, which run "
                    "around the result too, see the new values; fix: check them, or remove them (handle.remove())")
    for key, hook in original._forward_pre_hooks.items():
        if not _ours(hook):
            module.register_forward_pre_hook(hook, with_kwargs=key in original._forward_pre_hooks_with_kwargs)
    for key, hook in original._forward_hooks.items():
        module.register_forward_hook(hook, with_kwargs=key in original._forward_hooks_with_kwargs,
                                     always_call=key in original._forward_hooks_always_called)
    for hook in original._backward_pre_hooks.values():
        module.register_full_backward_pre_hook(hook)
    if original._is_full_backward_hook is not False:  # None: none registered; False: old-style ones, which torch warns off
        for hook in original._backward_hooks.values():
            module.register_full_backward_hook(hook)
    elif original._backward_hooks:
        said.append("the model's register_backward_hook hooks (torch's deprecated kind) are not carried to the result; "
                    "fix: register them on result.module with register_full_backward_hook")
    return said


def user_hooks(module: nn.Module) -> list[str]:
    """Paths of the modules that run hooks of the user's (forward, pre-forward or backward)."""
    return [path or "(the model)" for path, sub in module.named_modules()
            if any(not _ours(h) for h in sub._forward_pre_hooks.values()) or sub._forward_hooks
            or sub._backward_pre_hooks or sub._backward_hooks]
