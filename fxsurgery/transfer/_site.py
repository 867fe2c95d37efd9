"""What a convention adapter sees of an edit (transfer/_conventions.py, _vocabulary.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..rewrite import ModuleEdit
from ._assemble import Assembly


def config_of(module: nn.Module):
    """A transformers configuration (duck-typed: transfer never imports transformers), or None."""
    config = getattr(module, "config", None)
    return config if hasattr(config, "to_json_string") and hasattr(config, "num_hidden_layers") else None


@dataclass
class Site:
    """What an adapter sees: the new module (structure in place, values being filled), the original,
    the edit and its rule's label, and the assembly, where an adapter that makes a module says
    how its tensors are filled (`built.keeps`)."""

    module: nn.Module
    original: nn.Module
    edit: ModuleEdit
    label: str
    built: Assembly


def path_of(root: nn.Module, module: nn.Module | None) -> str | None:
    return next((p for p, sub in root.named_modules(remove_duplicate=False) if sub is module), None) if module is not None else None


def policy_text(weights) -> str:
    return f"select {len(weights['select'])} rows" if isinstance(weights, dict) else weights
