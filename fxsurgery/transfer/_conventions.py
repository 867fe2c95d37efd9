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

import re

from torch import nn

from ..rewrite import Around, Rewritten
from ._assemble import Assembly
from ._site import Site, config_of
from ._vocabulary import GONE, gone_warning, vocabulary

# the keys a configuration counts a layer stack by: num_hidden_layers (n_layer, num_layers), and where a model has
# two stacks, encoder_layers / decoder_layers (BART, Whisper) or num_decoder_layers (T5)
_COUNT = re.compile(r"(num_)?((hidden|encoder|decoder)_)?layers|n_layers?")


_PART_ALIASES = {("text", "language_model"), ("vision", "vision_tower")}


def _is_config(value) -> bool:
    return hasattr(value, "to_json_string")


def _count_key(config, path: str) -> str | None:
    """The key of `config` that counts the stack at `path`: by the side of the model the path is on (a decoder's
    stack by the decoder's key), else the one plain count; None where that is not one key."""
    keys = [k for k, v in vars(config).items() if _COUNT.fullmatch(k) and type(v) is int]
    words = path.split(".")
    side = next((s for s in ("decoder", "encoder") if any(s in w for w in words)), None)
    sided = [k for k in keys if side is not None and side in k]
    plain = [k for k in keys if "encoder" not in k and "decoder" not in k]
    chosen = sided or plain
    return chosen[0] if len(chosen) == 1 else None


def _counted_by(module: nn.Module, path: str) -> list[tuple[object, str]]:
    """(configuration, key) pairs that count the layers of the list at `path`.

    The model's configuration counts them, or the part of it the path is in
    (CLIP's text_config for text_model); a stack that keeps a copy of its own
    (T5's encoder and decoder) is counted there too.
    """
    root = getattr(module, "config", None)
    if not _is_config(root):
        return []
    words = path.split(".")
    parts = {name.removesuffix("_config"): sub for name, sub in vars(root).items() if _is_config(sub)}
    # a composite configuration: the part named like a module on the path (CLIP's text_model: text_config; an
    # EncoderDecoderModel's decoder: decoder; Llava's language_model: text_config)
    named = next((parts[stem] for w in words for stem in parts
                  if w == stem or w.startswith(stem + "_") or (stem, w) in _PART_ALIASES), None)
    counted = named if named is not None else root
    key = _count_key(counted, path)
    if key is None:
        return []
    counts = [(counted, key)]
    for i in range(len(words) - 1, 0, -1):
        owner = getattr(module.get_submodule(".".join(words[:i])), "config", None)
        if _is_config(owner) and owner is not root and owner is not counted and hasattr(owner, "num_hidden_layers"):
            counts.append((owner, "num_hidden_layers"))  # the stack reads its own copy's plain count
            break
    return counts


def _alias(config, key: str) -> str:
    """The common name of a configuration's key (GPT-2's n_layer is num_hidden_layers), as notes give it."""
    return next((alias for alias, real in getattr(config, "attribute_map", {}).items() if real == key), key)


def _key(config, key: str) -> str:
    """The name a configuration stores a key under (T5 keeps num_hidden_layers as num_layers)."""
    return getattr(config, "attribute_map", {}).get(key, key)


# a configuration's lists of one value per layer, in layer order: the kind of attention (GPT-Neo's attention_layers),
# whether the layer rotates positions (SmolLM3's no_rope_layers)
PER_LAYER = ("layer_types", "attention_layers", "no_rope_layers")


def layer_count(site: Site) -> list[str]:
    """`num_hidden_layers` (`num_decoder_layers`), `layer_types` and each layer's `layer_idx` after a layer stack is rearranged."""
    module, edit, label = site.module, site.edit, site.label
    counts = _counted_by(module, edit.path) if edit.kind == "layers" else []
    if not counts:
        return []
    config, key = counts[0]
    before = getattr(config, key)
    if len(site.original.get_submodule(edit.path)) != before:
        return []  # not the stack the configuration counts
    notes = []
    if len(edit.order) != before:
        part = next((f"config.{n}" for n, v in vars(module.config).items() if v is config), "config")
        for n, (cfg, k) in enumerate(counts):
            setattr(cfg, k, len(edit.order))
            where = part if n == 0 else f"{edit.path.rpartition('.')[0]}.config"
            notes.append(f"{where}.{_alias(cfg, k) if n == 0 else _key(cfg, k)}: {before} -> {len(edit.order)} ({label})")
    if list(edit.order) != list(range(before)):
        for key in PER_LAYER:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == before:
                setattr(config, key, [values[i] for i in edit.order])
                notes.append(f"config.{key}: follow the order {list(edit.order)} ({label})")
        if getattr(config, "attention_layers", None) is not None and hasattr(config, "attention_types"):
            config.attention_types = [[list(config.attention_layers), 1]]  # GPT-Neo rebuilds attention_layers from it
    moved = 0
    for i, layer in enumerate(module.get_submodule(edit.path)):
        for sub in layer.modules():
            for attr in ("layer_idx", "layer_id"):  # its slot in the KV cache (GPT-Neo, XLM: layer_id)
                index = getattr(sub, attr, None)
                if isinstance(index, int) and not isinstance(index, bool) and index != i:
                    setattr(sub, attr, i)
                    moved += 1
    if moved:
        notes.append(f"layer_idx of {moved} modules in {edit.path}: set to their new layer ({label})")
    return notes


HEADS = ("classifier", "score")


def label_count(site: Site) -> list[str]:
    """`num_labels` (and with it `id2label`/`label2id`) after a classification head becomes a Linear of N outputs."""
    module, edit, label = site.module, site.edit, site.label
    config = config_of(module)
    parts = edit.path.split(".")
    # the head itself, or the projection that ends one (RoBERTa's and ELECTRA's classifier.out_proj, BART's classification_head)
    ends = parts[-1] in HEADS or (len(parts) > 1 and parts[-1] == "out_proj" and parts[-2] in (*HEADS, "classification_head"))
    if edit.kind != "replace" or config is None or not ends:
        return []
    head = _last_linear(module.get_submodule(edit.path))   # a Linear, or an MLP head (mlp-head) that ends in one
    before = getattr(config, "num_labels", None)
    if head is None or not isinstance(before, int) or head.out_features == before:
        return []
    names = dict(getattr(config, "id2label", None) or {})
    config.num_labels = head.out_features  # transformers remakes id2label / label2id to match
    if isinstance(getattr(module, "num_labels", None), int):
        module.num_labels = head.out_features  # the loss reshapes logits by it
    rows = _rows_kept(edit.weights, before, head.out_features)
    default = all(names.get(i) in (None, f"LABEL_{i}") for i in range(before))
    if rows is None or (default and all(r in (i, None) for i, r in enumerate(rows))):
        return [f"config.num_labels: {before} -> {head.out_features}, id2label/label2id remade ({label})"]
    # the names of the classes whose rows the head kept go with them (select [0, 2] of neg, neu, pos: neg, pos;
    # select [4, 0] of transformers' default names: LABEL_4, LABEL_0, which say where each class came from)
    kept = {names.get(r, f"LABEL_{r}") for r in rows if r is not None}
    config.id2label = {i: names.get(r, f"LABEL_{r}") if r is not None else f"LABEL_{i}" if f"LABEL_{i}" not in kept else f"LABEL_{i}_new"
                       for i, r in enumerate(rows)}
    config.label2id = {name: i for i, name in config.id2label.items()}
    shown = ", ".join(str(v) for v in list(config.id2label.values())[:6]) + (", ..." if head.out_features > 6 else "")
    return [f"config.num_labels: {before} -> {head.out_features}, id2label follows the rows kept: {shown} ({label})"]


def class_count(site: Site) -> list[str]:
    """timm's `num_classes` after the module `get_classifier()` returns is replaced: a Linear's outputs,
    0 for Identity (timm's own `reset_classifier(0)`), the last Linear's outputs of a Sequential head."""
    module, original, edit = site.module, site.original, site.edit
    before = getattr(module, "num_classes", None)
    if not hasattr(original, "get_classifier") or not isinstance(before, int):
        return []
    try:
        if original.get_classifier() is not original.get_submodule(edit.path):
            return []
    except (AttributeError, TypeError):  # a get_classifier that is not timm's
        return []
    after = _classes(module.get_submodule(edit.path))
    if after is None or after == before:
        return []
    module.num_classes = after
    return [f"num_classes: {before} -> {after} ({site.label})"]


def _classes(head: nn.Module) -> int | None:
    """How many classes `head` gives: a Linear's outputs, 0 for Identity; through a layer inserted before or
    after it (an `Around`: its `after` where that ends in a Linear)."""
    if isinstance(head, Around):
        made = _last_linear(head.after) if head.after is not None else None
        return made.out_features if made is not None else _classes(head.module)
    last = _last_linear(head)
    return 0 if isinstance(head, nn.Identity) else last.out_features if last is not None else None


def _last_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear a head's outputs come from: the head itself, or the last layer of a Sequential head but
    dropout (torchvision.ops.MLP ends Linear, Dropout)."""
    layers = [m for m in head if not isinstance(m, (nn.Dropout, nn.Identity))] if isinstance(head, nn.Sequential) else [head]
    return layers[-1] if layers and isinstance(layers[-1], nn.Linear) else None


def _rows_kept(policy, before: int, after: int) -> list | None:
    """For each output row of the new head, the row of the old one its weights came from (None: a new row);
    None where the weights policy keeps no rows (new weights)."""
    if isinstance(policy, dict) and "select" in policy:
        return list(policy["select"])
    if policy in ("slice", "pad"):
        return [i if i < before else None for i in range(after)]
    return None


ADAPTERS = (layer_count, label_count, class_count, vocabulary)


def follow_conventions(module: nn.Module, rewritten: Rewritten, built: Assembly) -> list[str]:
    """Run every adapter on every module edit, in rule order; the changes they made.

    Run once the structure is assembled and before the weights policies fill
    it: an adapter may add a module for them to fill.
    """
    notes = []
    for edit in rewritten.edits:
        site = Site(module, rewritten.capture.model, edit, rewritten.rule_of(edit.rule).label, built)
        for adapter in ADAPTERS:
            made = adapter(site)
            notes += made
            # a special token whose row a vocabulary trim left out: generate() then has none (Llama's bos 1 of odd rows)
            rewritten.plan.warnings += [gone_warning(site.label, n) for n in made if GONE in n]
        rewritten.plan.warnings += position_bias(site)
    return notes


def position_bias(site: Site) -> list[str]:
    """A stack whose first layer computes the relative position bias every layer then reads (T5's block 0,
    `has_relative_attention_bias`): rearranged with another layer first, it runs with none, as by hand."""
    edit = site.edit
    if edit.kind != "layers" or not edit.order:
        return []
    stack = site.original.get_submodule(edit.path)
    holders = [i for i, layer in enumerate(stack) if any(getattr(s, "has_relative_attention_bias", False) is True for s in layer.modules())]
    if holders != [0] or edit.order[0] == 0:
        return []
    return [f"{site.label}: layer 0 of {edit.path} computes the relative position bias every layer reads, and layer "
            f"{edit.order[0]}, first now, has none: the stack runs without position information; fix: keep layer 0 first"]
