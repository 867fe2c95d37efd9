"""What a model family keeps outside its modules, made to follow an edit of the modules.

A transformers model reads its configuration while it runs (the decoder loops
over `layers[:config.num_hidden_layers]`, the KV cache has one slot per layer,
found by each attention's `layer_idx`) and again when it is reloaded
(`from_pretrained` builds the architecture from `config.json`). A kept model
whose modules changed must say so in its configuration, or it computes
something else, or reloads into something else. One adapter per family of
conventions; each returns a line per change it made.
"""

from __future__ import annotations

from torch import nn

from ..rewrite import ModuleEdit, Rewritten


def _config(module: nn.Module):
    """A transformers configuration (duck-typed: transfer never imports transformers), or None."""
    config = getattr(module, "config", None)
    return config if hasattr(config, "to_json_string") and hasattr(config, "num_hidden_layers") else None


def layer_count(module: nn.Module, original: nn.Module, edit: ModuleEdit, label: str) -> list[str]:
    """`num_hidden_layers`, `layer_types` and each layer's `layer_idx` after a layer stack is rearranged."""
    config = _config(module)
    if edit.kind != "layers" or config is None:
        return []
    before = config.num_hidden_layers
    if len(original.get_submodule(edit.path)) != before:
        return []  # not the stack the configuration counts
    notes = []
    if len(edit.order) != before:
        config.num_hidden_layers = len(edit.order)
        notes.append(f"config.num_hidden_layers: {before} -> {len(edit.order)} ({label})")
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == before and list(edit.order) != list(range(before)):
        config.layer_types = [types[i] for i in edit.order]
        notes.append(f"config.layer_types: follow the order {list(edit.order)} ({label})")
    moved = 0
    for i, layer in enumerate(module.get_submodule(edit.path)):
        for sub in layer.modules():
            index = getattr(sub, "layer_idx", None)
            if isinstance(index, int) and not isinstance(index, bool) and index != i:
                sub.layer_idx = i  # its slot in the KV cache
                moved += 1
    if moved:
        notes.append(f"layer_idx of {moved} modules in {edit.path}: set to their new layer ({label})")
    return notes


HEADS = ("classifier", "score")


def label_count(module: nn.Module, original: nn.Module, edit: ModuleEdit, label: str) -> list[str]:
    """`num_labels` (and with it `id2label`/`label2id`) after a classification head becomes a Linear of N outputs."""
    config = _config(module)
    if edit.kind != "replace" or config is None or edit.path.rpartition(".")[2] not in HEADS:
        return []
    head = module.get_submodule(edit.path)
    before = getattr(config, "num_labels", None)
    if not isinstance(head, nn.Linear) or not isinstance(before, int) or head.out_features == before:
        return []
    config.num_labels = head.out_features  # transformers remakes id2label / label2id to match
    if isinstance(getattr(module, "num_labels", None), int):
        module.num_labels = head.out_features  # the loss reshapes logits by it
    return [f"config.num_labels: {before} -> {head.out_features}, id2label/label2id remade ({label})"]


ADAPTERS = (layer_count, label_count)


def follow_conventions(module: nn.Module, rewritten: Rewritten) -> list[str]:
    """Run every adapter on every module edit, in rule order; the changes they made."""
    notes = []
    for edit in rewritten.edits:
        label = rewritten.rule_of(edit.rule).label
        for adapter in ADAPTERS:
            notes += adapter(module, rewritten.capture.model, edit, label)
    return notes
