"""graph.json's call form read back: the forward's signature and the trees of its call and output, as data
checked entry by entry (the adapter that restores it is capture/_call_shim.py's)."""

from __future__ import annotations

import inspect
from typing import Any

from ..capture import CallSpec
from ._graphload import Bad, decode, identifier, tree_structure

_KINDS = {k.name: k for k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)}


def call_form(data: Any) -> CallSpec:
    """The call form graph.json's `call` describes: the forward's signature, the trees of its call and output."""
    if not isinstance(data, dict) or set(data) != {"parameters", "call", "fixed", "order", "output"}:
        raise Bad("is not {parameters, call, fixed, order, output}")
    params = []
    for p in data["parameters"] if isinstance(data["parameters"], list) else [None]:
        if not (isinstance(p, dict) and set(p) - {"default"} == {"name", "kind"} and isinstance(p["name"], str) and isinstance(p["kind"], str)
                and identifier(p["name"]) and p["kind"] in _KINDS):
            raise Bad("parameters are not a list of {name, kind, default}")
        default = decode(p["default"], {}) if "default" in p else inspect.Parameter.empty
        params.append(inspect.Parameter(p["name"], _KINDS[p["kind"]], default=default))
    try:  # torch's own format: type names resolve only among the types registered with pytree, enums refused first
        signature, in_spec, out_spec = inspect.Signature(params), tree_structure(data["call"]), tree_structure(data["output"])
    except (NotImplementedError, Bad):
        raise
    except Exception as exc:
        raise Bad(f"does not hold a signature and tree structures torch reads ({type(exc).__name__}: {exc})") from None
    fixed, order, n = data["fixed"], data["order"], in_spec.num_leaves
    if not (isinstance(fixed, list) and all(isinstance(f, list) and len(f) == 2 and type(f[0]) is int and 0 <= f[0] < n for f in fixed)
            and isinstance(order, list) and all(type(i) is int and 0 <= i < n for i in order)):
        raise Bad("fixed or order are not positions in the call")
    constants = [None] * n
    for i, value in fixed:
        constants[i] = decode(value, {})
    tensors = sorted(set(range(n)) - {i for i, _ in fixed})
    if sorted(order) != tensors:
        raise Bad("order does not take each tensor of the call once")
    return CallSpec(in_spec, constants, tensors, order, None, [], out_spec=out_spec, signature=signature)
