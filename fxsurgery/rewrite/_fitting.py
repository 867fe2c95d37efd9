"""How a new module or function fits the call it takes over: names, input shapes, arguments."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

from .._util import first_line, shape_text
from ..errors import FxsError, RewriteError
from ..spec import New, fresh


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def expected_input(module: nn.Module, shape: tuple) -> tuple:
    """The input shape `module` accepts, derived from the one it was given."""
    shape = list(shape)
    if isinstance(module, nn.Linear) and shape:
        shape[-1] = module.in_features
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)) and len(shape) > 1:
        shape[1] = module.in_channels if hasattr(module, "in_channels") else module.num_features
    elif isinstance(module, nn.LayerNorm):
        n = len(module.normalized_shape)
        shape[-n:] = module.normalized_shape
    return tuple(shape)


def fit_call(target: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments of an old call, trimmed to what `target` accepts.

    `inplace=` is dropped where the new target does not take it: in-place is
    a memory optimisation, never part of the value a node produces.
    """
    fn = target.forward if isinstance(target, nn.Module) else target
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return args, {k: v for k, v in kwargs.items() if k != "inplace"}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        inspect.signature(fn).bind(*args, **kwargs)
        return args, kwargs
    except TypeError:
        return args[:1], {}


def mode_at(model: nn.Module, path: str) -> bool:
    """The train/eval mode a module made at `path` takes: that of the original module there, or of the
    nearest one above it (a layer inserted beside a module in an eval-mode model runs in eval mode too)."""
    found = model
    for part in path.split(".") if path else ():
        found = getattr(found, "_modules", {}).get(part)
        if found is None:
            break
        model = found
    return model.training


def build(m, spec: Any, shape: tuple | None, where, like: tuple = (None, None), training: bool | None = None) -> nn.Module:
    """The module a rule asks for: a copy of an instance, or a `fxs.new` spec built for the incoming shape,
    in the dtype and device `like` gives (those of what it replaces or sits beside: `spec.like`), and in
    the mode `training` (`mode_at`): a Dropout or BatchNorm made in train mode inside an eval-mode model
    would drop and update statistics while the model says eval."""
    made = _built(m, spec, shape, where, like)
    if training is not None and isinstance(made, nn.Module):
        made.train(training)
    return made


def _built(m, spec: Any, shape: tuple | None, where, like: tuple) -> nn.Module:
    if not isinstance(spec, New):
        return fresh(spec)
    try:
        return spec.build(shape, like)
    except FxsError as exc:
        raise RewriteError(f"{m.label} at '{where}': {exc.message}") from None
    except Exception as exc:
        memory = isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "allocate" in str(exc)
        fix = "give sizes that fit in memory" if memory else "give the missing constructor arguments explicitly"
        raise RewriteError(f"{m.label} at '{where}': cannot build {spec} for incoming shape "
                           f"{shape_text(shape) if shape else 'unknown'}: {first_line(exc)}; fix: {fix}") from None
