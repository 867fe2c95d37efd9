"""A kept transformers model, streamed: its configuration as its library writes it, its weights shard by shard.

`save_pretrained` needs every tensor in memory; a streamed result holds its
checkpoint's tensors on meta. Its configuration files are written by the
library (`config.save_pretrained`, `generation_config.save_pretrained`) and its
weights by _shards.py in the layout the library reads back
(`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index), tied
parameters once under their first name, as `save_pretrained` writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._util import first_line
from ..errors import SaveError
from ._shards import lazy_names, write


def _as_graph(module) -> str:
    """The way to a model.py: a graph module, which takes no cache object (the next error, otherwise, for a causal LM)."""
    generates = callable(getattr(module, "can_generate", None)) and module.can_generate()  # a causal LM passes a cache on
    cached = generates and getattr(getattr(module, "config", None), "use_cache", False) is True
    return ("apply with keep_class=False (--no-keep-class; saved as model.py + safetensors)"
            + (" to the model built with config.use_cache=False" if cached else ""))


def refuse_unloadable(module: nn.Module, original: nn.Module | None = None) -> None:
    """Refuse a kept model its own configuration no longer builds: `from_pretrained` would refuse it
    (heads removed per layer, which a transformers config cannot say), drop a tensor the config does not
    build (an adapter), or leave one it builds at random init (a layer deleted in place). Nothing else
    reads that format. The class is built from the config on meta, so this costs no weights."""
    kind = type(module).__name__
    try:  # as from_pretrained reads it: config.json through the class's own checks (GPT-Neo's layer kinds per layer)
        config = type(module.config).from_dict(module.config.to_dict())
    except Exception as exc:
        raise SaveError(f"{kind}: its config does not load back ({type(exc).__name__}: {first_line(str(exc))}), so "
                        f"from_pretrained could not reload it; fix: {_as_graph(module)}") from None
    try:
        with torch.device("meta"):
            fresh = type(module)(config)
    except Exception:  # a class its config cannot build here: from_pretrained decides
        return
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    state = module.state_dict()
    for name, tensor in state.items():
        if name in shapes and shapes[name] != tensor.shape:
            raise SaveError(f"{kind}: '{name}' is {list(tensor.shape)} but its config builds {list(shapes[name])}, so "
                            f"from_pretrained could not reload it; fix: {_as_graph(module)}")
    extra = [name for name in state if name not in shapes]
    missing = [name for name in shapes if name not in state]
    bias = next((n for n in extra + missing if n.endswith(".relative_attention_bias.weight")), None)
    if bias is not None:  # T5 builds the position bias in layer 0 alone; a Layers order put another layer first
        stack = bias.split(".layer.")[0].rpartition(".")[0]
        raise SaveError(f"{kind}: from_pretrained builds the relative position bias into layer 0 of {stack}, which has none "
                        f"now; fix: keep layer 0 first in the Layers order, or {_as_graph(module)}")
    if extra:
        raise SaveError(f"{kind}: '{extra[0]}' ({len(extra)} tensors in all) is not built by its config, so from_pretrained "
                        f"would drop it; fix: {_as_graph(module)}")
    if missing:
        raise SaveError(f"{kind}: its config builds '{missing[0]}' ({len(missing)} tensors in all), which the model lacks, "
                        "so from_pretrained would leave them at random init; fix: remove layers with Layers(path, "
                        "order=[...]), which the config follows, or apply with keep_class=False (--no-keep-class)")
    if original is not None:
        _same_modules(module, fresh, kind, dict(original.named_modules()))


def _same_modules(module: nn.Module, fresh: nn.Module, kind: str, before: dict[str, nn.Module]) -> None:
    """Refuse where the config builds other modules than the model has, or sets a layer otherwise (a kind of attention,
    a rotation of positions, a cache slot kept per layer in the config, which a layer edit did not follow): the
    reloaded model would compute something else, with every tensor in place. Only where the surgery made the
    difference: what the original (`before`, by path) had too is the library's own (a copy of a layer count its
    forward never reads, an attention class chosen by attn_implementation, which config.json does not keep)."""
    theirs = dict(fresh.named_modules())
    for path, sub in module.named_modules():
        other, was = theirs.get(path), before.get(path)
        if other is None:
            continue  # its tensors decide (above)
        if type(other).__name__ != type(sub).__name__ and type(was) is not type(sub):
            raise SaveError(f"{kind}: its config builds '{path}' as {type(other).__name__}, here a {type(sub).__name__}, so "
                            f"from_pretrained would reload another model; fix: {_as_graph(module)}")
        for name, value in vars(sub).items():
            if name.startswith("_") or name in _RUNTIME or not isinstance(value, (bool, int, float, str, type(None))):
                continue
            built = vars(other).get(name, value)
            kept = was is not None and type(was) is type(sub) and vars(was).get(name, _NONE) == value
            if isinstance(built, (bool, int, float, str, type(None))) and built != value and value == value and not kept:  # NaN: itself
                where = f"{path}.{name}" if path else name
                raise SaveError(f"{kind}: its config builds {where} = {built!r}, here {value!r}, so from_pretrained "
                                f"would reload another model; fix: {_as_graph(module)}")


_RUNTIME = ("training", "gradient_checkpointing")  # set by calls on the model, not by its config
_NONE = object()


def write_pretrained(module: nn.Module, work: Path, limit: int, lazy: dict, ties: dict[str, str]) -> dict[str, str]:
    """Write config.json (and generation_config.json) and the weights into `work`; {shard: sha256}."""
    config = module.config
    config.architectures = [type(module).__name__]
    config.save_pretrained(work)
    generation = getattr(module, "generation_config", None)
    if generation is not None and getattr(module, "can_generate", lambda: False)():
        generation.save_pretrained(work)
    readers = lazy_names(module, lazy)
    state = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items() if k not in ties}
    return write(work, {k: readers.get(k, v) for k, v in state.items()}, state, limit)
