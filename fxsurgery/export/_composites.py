"""Constructor arguments of torch.nn's composite layers, which keep them only in their children.

nn.TransformerEncoderLayer keeps no `d_model`, nn.TransformerEncoder no
`encoder_layer`: read back from the children, model.py and graph.json can
rebuild them, and the rebuild is checked against the original like any other
module's. A module-valued argument is written as its own constructor,
`{"module": spec}`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {F.relu: "relu", F.gelu: "gelu"}  # what the layers keep of activation="relu" / "gelu"


def _layer(m: nn.Module) -> dict:
    act = m.activation
    return {"d_model": m.self_attn.embed_dim, "nhead": m.self_attn.num_heads, "dim_feedforward": m.linear1.out_features,
            "dropout": m.dropout.p, "activation": act if isinstance(act, nn.Module) else _ACTIVATIONS.get(act, act),
            "layer_norm_eps": m.norm1.eps, "batch_first": m.self_attn.batch_first, "norm_first": m.norm_first,
            "bias": m.linear1.bias is not None}


def _encoder(m: nn.Module) -> dict:
    return {"encoder_layer": m.layers[0], "num_layers": len(m.layers), "norm": m.norm,
            "enable_nested_tensor": m.enable_nested_tensor, "mask_check": m.mask_check}


def _decoder(m: nn.Module) -> dict:
    return {"decoder_layer": m.layers[0], "num_layers": len(m.layers), "norm": m.norm}


def _transformer(m: nn.Module) -> dict:
    return {**_layer(m.encoder.layers[0]), "num_encoder_layers": len(m.encoder.layers), "num_decoder_layers": len(m.decoder.layers)}


_READERS = {nn.TransformerEncoderLayer: _layer, nn.TransformerDecoderLayer: _layer, nn.TransformerEncoder: _encoder,
            nn.TransformerDecoder: _decoder, nn.Transformer: _transformer}


def composite_arguments(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments a composite keeps in its children ({} for other modules, and for one whose
    children are not what its class makes: its rebuild then fails the check, as any other module's would)."""
    read = _READERS.get(type(module))
    try:
        return read(module) if read is not None else {}
    except (AttributeError, IndexError, TypeError):
        return {}


def is_nested(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"module"}


def instance(spec: dict) -> nn.Module:
    """The module a spec describes (on whatever device is current), its class imported by its public name."""
    if "items" in spec:
        return nn.Sequential(*(instance(s) for s in spec["items"]))
    module, _, name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: instance(v["module"]) if is_nested(v) else v for k, v in spec["kwargs"].items()})


_PLAIN = (bool, int, float, str, type(None))


def settings(module: nn.Module) -> list:
    """Every submodule's plain settings, and the functions it holds by name (an activation): what `repr` leaves
    out of a transformer layer (norm_first, the activation function, its attention's dropout), which a rebuild
    from the first layer's arguments must also match in every layer."""
    out = []
    for path, sub in module.named_modules():
        items = {k: (v if isinstance(v, _PLAIN) else getattr(v, "__qualname__", type(v).__name__))
                 for k, v in vars(sub).items() if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}
        out.append((path, type(sub).__name__, sorted(items.items(), key=lambda kv: kv[0])))
    return out
