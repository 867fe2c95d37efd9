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
from dataclasses import dataclass

from torch import nn

from ..errors import TransferError
from ..rewrite import ModuleEdit, Rewritten
from ._assemble import Assembly, put


def _config(module: nn.Module):
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


def label_count(site: Site) -> list[str]:
    """`num_labels` (and with it `id2label`/`label2id`) after a classification head becomes a Linear of N outputs."""
    module, edit, label = site.module, site.edit, site.label
    config = _config(module)
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
    if edit.kind != "replace" or not hasattr(original, "get_classifier") or not isinstance(before, int):
        return []
    try:
        if original.get_classifier() is not original.get_submodule(edit.path):
            return []
    except (AttributeError, TypeError):  # a get_classifier that is not timm's
        return []
    head = module.get_submodule(edit.path)
    last = _last_linear(head)
    after = 0 if isinstance(head, nn.Identity) else last.out_features if last is not None else None
    if after is None or after == before:
        return []
    module.num_classes = after
    return [f"num_classes: {before} -> {after} ({site.label})"]


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


def _path_of(root: nn.Module, module: nn.Module | None) -> str | None:
    return next((p for p, sub in root.named_modules(remove_duplicate=False) if sub is module), None) if module is not None else None


def vocabulary(site: Site) -> list[str]:
    """`vocab_size` after the input embedding is replaced by one of another size, and the rest of the vocabulary with it.

    As transformers' `resize_token_embeddings` resizes input and output
    embeddings together: each module that shared the old embedding's weight
    (tied output embeddings, T5's `encoder.embed_tokens`) shares the new one,
    so tied stays tied; an output embedding with a weight of its own becomes a
    Linear of the new size, filled by the same weights policy from the old one
    (`{select: rows}` keeps those token ids in both).
    """
    module, original, edit, label = site.module, site.original, site.edit, site.label
    config = _config(module)
    if edit.kind != "replace" or config is None or not isinstance(edit.module, nn.Embedding):
        return []
    old = original.get_submodule(edit.path)
    embeddings = original.get_input_embeddings() if hasattr(original, "get_input_embeddings") else None
    if not isinstance(old, nn.Embedding) or getattr(embeddings, "weight", None) is not old.weight:
        return []  # not the vocabulary (T5 calls encoder.embed_tokens, which holds the weight of `shared`)
    new = module.get_submodule(edit.path)
    before, after = config.vocab_size, new.num_embeddings
    if (before == after and not isinstance(edit.weights, dict)) or old.num_embeddings != before:
        return []  # the same tokens in the same rows (a select may also reorder them)
    config.vocab_size = after
    notes = [f"config.vocab_size: {before} -> {after} ({label})"] if after != before else []
    notes += _renumber(module, edit.weights, before, after, label)
    made = site.built.made_by
    shared = [p for p, sub in original.named_modules(remove_duplicate=False)
              if p != edit.path and getattr(sub, "weight", None) is old.weight and id(module.get_submodule(p)) not in made]
    for p in [p for p in shared if getattr(module.get_submodule(p), "bias", None) is not None]:
        notes.append(_resize_biased(site, p, new, before, after))
        shared.remove(p)
    for p in shared:
        sub = module.get_submodule(p)
        sub.weight = new.weight
        for attr in ("num_embeddings", "out_features"):
            if hasattr(sub, attr):
                setattr(sub, attr, after)
    if shared:
        notes.append(f"{', '.join(shared)}: share the new {edit.path}.weight, as they shared the old one ({label})")
    head = original.get_output_embeddings() if hasattr(original, "get_output_embeddings") else None
    path = _path_of(original, head)
    if path is None or path in shared or not isinstance(head, nn.Linear) or head.out_features != before \
            or id(module.get_submodule(path)) in made:
        return notes
    w = head.weight
    resized = nn.Linear(head.in_features, after, bias=head.bias is not None, device=w.device, dtype=w.dtype)
    put(module, path, resized)
    made[id(resized)] = edit.rule
    if edit.weights != "new":
        site.built.keeps.append((path, resized, head, edit.rule, edit.weights))
    notes.append(f"{path}: {before} -> {after} outputs, weights {_policy(edit.weights)} as {edit.path} ({label})")
    return notes


def _resize_biased(site: Site, path: str, new: nn.Embedding, before: int, after: int) -> str:
    """An output layer tied to the embedding with a bias over the vocabulary (BERT's MLM decoder, whose bias is also
    `cls.predictions.bias`): a Linear of the new size, its weight the new embedding's, its bias rows kept by the same
    weights policy, and every other path to the old bias holding the new one."""
    module, original, edit = site.module, site.original, site.edit
    old = original.get_submodule(path)
    if not isinstance(old, nn.Linear) or old.bias.shape != (before,):
        raise TransferError(f"{site.label}: {path} shares the embedding's weight and has a bias that is not one per token, "
                            "which the embedding's replacement cannot resize; fix: replace it too, by a module of the new size")
    resized = nn.Linear(old.in_features, after, device=old.weight.device, dtype=old.weight.dtype)
    put(module, path, resized)
    site.built.made_by[id(resized)] = edit.rule
    if edit.weights != "new":  # fills the weight with the rows the embedding gets, then shares the embedding's
        site.built.keeps.append((path, resized, old, edit.rule, edit.weights))
    resized.weight = new.weight
    others = [n for n, t in original.named_parameters(remove_duplicate=False) if t is old.bias and n != f"{path}.bias"]
    for name in others:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, resized.bias)
    also = f"; {', '.join(others)} with it" if others else ""
    return f"{path}: {before} -> {after} outputs, sharing the new {edit.path}.weight, bias {_policy(edit.weights)}{also} ({site.label})"


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_GONE = " (its row is not kept)"


def _renumber(module: nn.Module, weights, before: int, after: int, label: str) -> list[str]:
    """Special token ids follow their rows: token i of a `{select: rows}` vocabulary is old token rows[i].

    In the configuration and the generation configuration (what `generate()`
    reads); an id whose row is gone becomes None, said in a note.
    """
    if isinstance(weights, dict):
        new_id = {old: i for i, old in reversed(list(enumerate(weights["select"])))}
    elif weights == "slice":
        new_id = {i: i for i in range(after)}
    else:
        return []  # rows kept in place (pad, new): ids keep their meaning
    notes = []
    for where, config in (("config", module.config), ("generation_config", getattr(module, "generation_config", None))):
        for key in SPECIAL_TOKENS:
            value = getattr(config, key, None)
            ids = value if isinstance(value, list) else [value]
            if not ids or not all(isinstance(i, int) and 0 <= i < before for i in ids):
                continue  # unset, or not a token of this vocabulary
            moved = [new_id.get(i) for i in ids]
            if isinstance(value, list):  # several eos ids: those whose rows are kept
                now = [i for i in moved if i is not None] or None
            else:
                now = moved[0]
            if now != value:
                setattr(config, key, now)
                gone = _GONE if None in moved else ""
                notes.append(f"{where}.{key}: {value} -> {now}{gone} ({label})")
    return notes


def _gone_warning(label: str, note: str) -> str:
    """The warning for a note of `_renumber` whose id lost its row: eos [2, 7] without row 2 is [5] (7's new id)."""
    field, _, change = note.partition(": ")
    value, _, now = change.partition(" -> ")
    now = now.partition(_GONE)[0]
    holds = "holds a row" if value.startswith("[") and now != "None" else "is a row"
    return f"{label}: {field} {value} {holds} the trim does not keep, so it is {now} now; fix: keep that row"


def _policy(weights) -> str:
    return f"select {len(weights['select'])} rows" if isinstance(weights, dict) else weights


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
            rewritten.plan.warnings += [_gone_warning(site.label, n) for n in made if _GONE in n]
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
