"""A vocabulary trim on a kept transformers model: the configuration, the output embedding and the special token
ids follow the input embedding's rows (transfer/_conventions.py runs it with the other adapters)."""

from __future__ import annotations

from torch import nn

from ..errors import TransferError
from ._assemble import put
from ._site import Site, config_of, path_of, policy_text


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
    config = config_of(module)
    if edit.kind != "replace" or config is None or not isinstance(edit.module, nn.Embedding):
        return []
    old = original.get_submodule(edit.path)
    embeddings = original.get_input_embeddings() if hasattr(original, "get_input_embeddings") else None
    if not isinstance(old, nn.Embedding) or getattr(embeddings, "weight", None) is not old.weight:
        return []  # not the vocabulary (T5 calls encoder.embed_tokens, which holds the weight of `shared`)
    new = module.get_submodule(edit.path)
    before, after = config.vocab_size, new.num_embeddings
    class_notes = _embedding_like(new, old, _new_ids(edit.weights, before, after), edit.path, label)
    if (before == after and not isinstance(edit.weights, dict)) or old.num_embeddings != before:
        return class_notes  # the same tokens in the same rows (a select may also reorder them)
    config.vocab_size = after
    notes = class_notes + ([f"config.vocab_size: {before} -> {after} ({label})"] if after != before else [])
    pad = config.pad_token_id if hasattr(config, "pad_token_id") else None
    notes += _renumber(module, edit.weights, before, after, label)
    for attr, was, now in (("vocab_size", before, after), ("padding_idx", pad, getattr(config, "pad_token_id", None))):
        copies = []  # copies of the config's value a class keeps (Gemma's model and head: the loss reshapes by vocab_size)
        for p, sub in module.named_modules():
            if not isinstance(sub, nn.Embedding) and type(getattr(sub, attr, None)) is int and getattr(sub, attr) == was != now:
                setattr(sub, attr, now)
                copies.append(p or "the model")
        if copies:
            notes.append(f"{attr} of {', '.join(copies)}: {was} -> {now} ({label})")
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
    path = path_of(original, head)
    if path is None or path in shared or not isinstance(head, nn.Linear) or head.out_features != before \
            or id(module.get_submodule(path)) in made:
        return notes
    w = head.weight
    resized = nn.Linear(head.in_features, after, bias=head.bias is not None, device=w.device, dtype=w.dtype)
    put(module, path, resized)
    made[id(resized)] = edit.rule
    if edit.weights != "new":
        site.built.keeps.append((path, resized, head, edit.rule, edit.weights))
    notes.append(f"{path}: {before} -> {after} outputs, weights {policy_text(edit.weights)} as {edit.path} ({label})")
    return notes


def tie_flag(module: nn.Module, original: nn.Module) -> list[str]:
    """`tie_word_embeddings` False where the edit left the output embedding a tensor of its own (a new lm_head):
    transformers ties by that flag again in `tie_weights()`, `resize_token_embeddings` and `from_pretrained`, which
    put the input embedding back in place of the new head."""
    config = config_of(module)
    if config is None or getattr(config, "tie_word_embeddings", None) is not True or not hasattr(module, "get_output_embeddings"):
        return []
    ends = [(m.get_input_embeddings(), m.get_output_embeddings()) for m in (module, original)]
    if any(getattr(a, "weight", None) is None or getattr(b, "weight", None) is None for a, b in ends):
        return []
    (now_in, now_out), (was_in, was_out) = ends
    if was_out.weight is not was_in.weight or now_out.weight is now_in.weight:
        return []
    config.tie_word_embeddings = False
    return [f"config.tie_word_embeddings: True -> False: {path_of(module, now_out)}.weight is a tensor of its own now"]


def _new_ids(weights, before: int, after: int) -> dict[int, int]:
    """Old token id -> new one: token i of a `{select: rows}` vocabulary is old token rows[i]; other policies keep
    rows in place."""
    if isinstance(weights, dict):
        return {old: i for i, old in reversed(list(enumerate(weights["select"])))}
    return {i: i for i in range(min(before, after))}


def _embedding_like(new: nn.Module, old: nn.Embedding, new_id: dict[int, int], path: str, label: str) -> list[str]:
    """A plain nn.Embedding put in place of a subclass with a forward of its own (Gemma's, BART's and a dozen more
    families' scaled embeddings, `* embed_scale`) takes that class and its constant attributes: it computed without
    the scale, and from_pretrained rebuilds the subclass anyway. Its padding row is the old one's, renumbered, so
    that row trains no more than it did."""
    notes = []
    if type(new) is nn.Embedding and type(old) is not nn.Embedding and new.embedding_dim == old.embedding_dim \
            and not old._modules and set(old._parameters) == {"weight"} and set(old._buffers) <= old._non_persistent_buffers_set:
        for name, value in vars(old).items():
            if name not in vars(new) and not name.startswith("_"):
                new.__dict__[name] = value
        for name, buffer in old._buffers.items():
            new.register_buffer(name, buffer.clone() if buffer is not None else None, persistent=False)
        new.__class__ = type(old)
        notes.append(f"{path}: a {type(old).__name__} as before, whose forward is its own, as from_pretrained rebuilds it ({label})")
    if old.padding_idx is not None and new.padding_idx is None and new_id.get(old.padding_idx) is not None:
        new.padding_idx = new_id[old.padding_idx]
        notes.append(f"{path}.padding_idx: {new.padding_idx}, the pad token's row ({old.padding_idx} in the old embedding) ({label})")
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
    return f"{path}: {before} -> {after} outputs, sharing the new {edit.path}.weight, bias {policy_text(edit.weights)}{also} ({site.label})"


# the ids generate() reads (forced_bos: mBART's and NLLB's target language; suppress_tokens: Whisper's)
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
                  "forced_eos_token_id", "sep_token_id", "suppress_tokens", "begin_suppress_tokens")
GONE = " (its row is not kept)"


def _renumber(module: nn.Module, weights, before: int, after: int, label: str) -> list[str]:
    """Special token ids follow their rows: token i of a `{select: rows}` vocabulary is old token rows[i].

    In the configuration and the generation configuration (what `generate()`
    reads); an id whose row is gone becomes None, said in a note.
    """
    if not isinstance(weights, dict) and weights != "slice":
        return []  # rows kept in place (pad, new): ids keep their meaning
    new_id = _new_ids(weights, before, after)
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
                gone = GONE if None in moved else ""
                notes.append(f"{where}.{key}: {value} -> {now}{gone} ({label})")
    return notes


def gone_warning(label: str, note: str) -> str:
    """The warning for a note of `_renumber` whose id lost its row: eos [2, 7] without row 2 is [5] (7's new id)."""
    field, _, change = note.partition(": ")
    value, _, now = change.partition(" -> ")
    now = now.partition(GONE)[0]
    holds = "holds a row" if value.startswith("[") and now != "None" else "is a row"
    return f"{label}: {field} {value} {holds} the trim does not keep, so it is {now} now; fix: keep that row"
