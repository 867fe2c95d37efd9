"""Checkpoint files: read safely, and undo the prefixes wrappers add to keys.

Weights are read from safetensors, or from torch files with
`weights_only=True`; nothing here runs code from a file.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ModelError

# DataParallel / DistributedDataParallel and torch.compile wrap a model and
# prefix every key of its state dict.
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a weights-only torch checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such weights file; fix: check the path")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot read weights: {first}; fix: pass a complete .safetensors file (or a weights-only .pt)") from None
    except Exception as exc:  # torch's weights-only unpickler refuses anything that is not plain data
        raise ModelError(f"{path}: refused: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; fix: save the weights with safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors; fix: save model.state_dict() to safetensors")
    return state


def strip_prefixes(state: dict, where: str = "the checkpoint") -> dict:
    """Drop `module.` / `_orig_mod.` when every key carries it; a partial prefix is an error."""
    for prefix in PREFIXES:
        carrying = [k for k in state if k.startswith(prefix)]
        if carrying and len(carrying) == len(state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        elif carrying:
            bare = [k for k in state if not k.startswith(prefix)]
            raise ModelError(f"{where}: {len(carrying)} keys start with {prefix!r} ({carrying[0]}, ...) but {len(bare)} do not ({bare[0]}, ...); fix: save the weights of one model, unwrapped")
    return state
