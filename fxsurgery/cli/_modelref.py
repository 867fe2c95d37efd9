"""Model references on the command line: factories, files, saved directories.

    package.module:factory      torchvision.models:resnet18 (called with no arguments)
    path/file.py:Name           a class, factory or instance in a Python file
    DIR                         a directory written by save(), rebuilt from its graph.json
                                (its model.py is imported only with --trust-code)
    FILE.pt                     a pickled model, only with --trust-pickle
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..export import load as load_saved

_MAX_INPUT = 1 << 28  # values in one example input: 1 GiB of float32
_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64, "long": torch.int64,
           "int32": torch.int32, "bool": torch.bool}


def load_model(ref: str, *, trust_pickle: bool = False, trust_code: bool = False, allow: tuple[str, ...] = ()) -> nn.Module:
    """The nn.Module a reference names (see the module docstring)."""
    path = Path(ref)
    if path.is_dir():
        return load_saved(path, trust_code=trust_code, allow=allow)
    if ":" in ref and not path.is_file():
        where, _, name = ref.rpartition(":")
        if not where or not name:
            raise ModelError(f"{ref}: expected package.module:factory or path/file.py:Name; fix: e.g. torchvision.models:resnet18")
        obj = _attribute(where, name, ref)
        return _instantiate(obj, ref)
    if path.is_file() and path.suffix == ".py":
        raise ModelError(f"{ref}: a Python file needs the name of its model, class or factory; fix: write {ref}:Name")
    if path.is_file():
        kind = _file_kind(path, probe=not trust_pickle)  # trusted, the load itself says what it holds
        if kind != "pickle":  # --trust-pickle is no fix for a file that is no pickled model
            raise ModelError(f"{ref}: {kind}; fix: name the model (package.module:factory, path/file.py:Name or a "
                             "saved directory)" + (f" and pass {ref} as --weights" if kind.startswith("holds") else ""))
        if not trust_pickle:
            raise ModelError(f"{ref}: a pickled model runs code from the file when loaded; fix: pass --trust-pickle if you trust it, or name a factory "
                             f"(package.module:factory)")
        try:
            model = torch.load(ref, map_location="cpu", weights_only=False)  # the user vouched for it with --trust-pickle
        except Exception as exc:
            raise ModelError(f"{ref}: cannot load the pickled model: {type(exc).__name__}: {exc}; fix: check the file") from None
        if not isinstance(model, nn.Module):
            what = "weights (a state dict)" if isinstance(model, dict) else f"a {type(model).__name__}"
            raise ModelError(f"{ref}: holds {what}, not a model; fix: name the model (package.module:factory, path/file.py:Name "
                             f"or a saved directory) and pass {ref} as --weights")
        return model
    if path.exists():  # /dev/zero, a FIFO: read, neither would end
        raise ModelError(f"{ref}: is not a regular file; fix: name the model (package.module:factory, path/file.py:Name or a saved directory)")
    raise ModelError(f"{ref}: no such file or directory, and not of the form package.module:factory; fix: e.g. torchvision.models:resnet18")


def _file_kind(path: Path, probe: bool) -> str:
    """"pickle" for a file that may hold a pickled model; else what it is, read without running anything from it
    (`probe`: a pickle is loaded weights-only, which tells a state dict)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "holds safetensors weights, not a model"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a pickle's protocol byte
        return "is no model file (neither a pickle nor torch.save's zip)"
    if not probe:
        return "pickle"
    try:  # weights_only runs no code from the file: tensors and containers of them are weights, not a model
        torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return "pickle"
    return "holds weights (a state dict), not a model"


def _attribute(where: str, name: str, ref: str):
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ModelError(f"{ref}: file {where} does not exist; fix: check the path")
        spec = importlib.util.spec_from_file_location(f"_fxsurgery_user_{uuid.uuid4().hex}", where)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SystemExit as exc:
            raise ModelError(f"{ref}: importing {where} exited the process (SystemExit: {exc.code}); fix: keep the file's "
                             "script part under `if __name__ == '__main__':`") from None
        except Exception as exc:
            raise ModelError(f"{ref}: importing {where} failed: {type(exc).__name__}: {exc}; fix: run the file with python to see why") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ModelError(f"{ref}: cannot import {where!r}: {exc}; fix: install the package or correct the name") from None
    if not hasattr(module, name):
        names = [n for n in dir(module) if not n.startswith("_")]
        # by spelling, case aside: resnet81, Resnet18 -> resnet18 (not the names that share three letters)
        lowered = {n.lower(): n for n in sorted(names, key=lambda n: (n != n.lower(), n))}
        close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
        inside = _submodules_with(where, name) if not where.endswith(".py") else []
        hint = (f"did you mean {inside[0]}:{name}?" if inside else f"did you mean {', '.join(close)}?" if close else "check the name")
        raise ModelError(f"{ref}: {where} has no attribute {name!r}; fix: {hint}")
    return getattr(module, name)


def _submodules_with(where: str, name: str) -> list[str]:
    """Public submodules of `where`, already imported, that hold `name` (torchvision:resnet18 -> torchvision.models),
    shortest first; nothing is imported to look."""
    found = [key for key, module in list(sys.modules.items())
             if key.startswith(where + ".") and not any(part.startswith("_") for part in key.split("."))
             and callable(getattr(module, name, None))]
    return sorted(found, key=lambda key: (key.count("."), key))


def _instantiate(obj, ref: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelError(f"{ref}: is a {type(obj).__name__}, not a model, a model class or a factory; fix: name an nn.Module class or a function returning one")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise ModelError(f"{ref}: needs arguments to build a model; fix: name a factory that takes none (wrap it in a function in a .py file)") from None
    except ValueError:
        pass
    try:
        model = obj()
    except SystemExit as exc:  # sys.exit, exit(): would end the command as if it had succeeded
        raise ModelError(f"{ref}: building the model exited the process (SystemExit: {exc.code}); "
                         "fix: name a factory that returns a model") from None
    except Exception as exc:
        raise ModelError(f"{ref}: building the model failed: {type(exc).__name__}: {exc}; fix: check the factory") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref}: returned a {type(model).__name__}, not a torch.nn.Module; fix: name a factory that returns a model")
    return model


def parse_inputs(specs) -> tuple[tuple, dict]:
    """`--input 1x3x224x224` (repeatable; `:int64` etc. for other dtypes) to example tensors;
    `--input attention_mask=1x16:int64` to a keyword input. (positional inputs, keyword inputs)."""
    out, keywords = [], {}
    generator = torch.Generator().manual_seed(0)
    for spec in specs or []:
        parts = spec.split(",")
        if len(parts) >= 3 and all(p.strip().isdigit() for p in parts):  # 1,3,224,224: a shape written as a tuple
            raise ModelError(f"--input {spec!r}: commas separate inputs, so this is {len(parts)} inputs of one size each; fix: join one "
                             f"input's sizes with x: --input {'x'.join(p.strip() for p in parts)} (or repeat --input for one-dimensional inputs)")
        for part in parts:
            name, _, text = part.rpartition("=")
            name = name.strip()
            if "=" in part and not name:  # "=1x4" read as positional would bind to whatever parameter comes first
                raise ModelError(f"--input {spec!r}: no name before '='; fix: write NAME=SIZES, e.g. attention_mask=1x16:int64, "
                                 "or the sizes alone for a positional input")
            if name and not name.isidentifier():
                raise ModelError(f"--input {spec!r}: {name!r} is not a parameter name; fix: write NAME=SIZES, e.g. attention_mask=1x16:int64")
            match = re.fullmatch(r"\s*(\d+(?:x\d+)*)(?::(\w+))?\s*", text)
            if not match or (match.group(2) and match.group(2) not in _DTYPES):
                raise ModelError(f"--input {spec!r}: cannot parse {part!r}; fix: write sizes joined by x, e.g. 1x3x224x224 (optionally :int64)")
            if keywords and not name:
                raise ModelError(f"--input {spec!r}: a positional input after keyword ones; fix: give positional inputs first")
            shape = tuple(int(d) for d in match.group(1).split("x"))
            dtype = _DTYPES[match.group(2) or "float32"]
            if 0 in shape:  # an empty example runs every layer on nothing: no value is checked
                raise ModelError(f"--input {spec!r}: a size of 0 gives an empty example, which checks nothing; fix: use sizes of 1 or "
                                 "more, e.g. 1x3x224x224")
            if math.prod(shape) > _MAX_INPUT:
                raise ModelError(f"--input {spec!r}: {math.prod(shape):,} values is more than an example needs; fix: use a batch of 1 and the model's "
                                 f"usual size, e.g. 1x3x224x224")
            value = (torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                     else torch.zeros(shape, dtype=dtype))
            if name:
                keywords[name] = value
            else:
                out.append(value)
    return tuple(out), keywords


_WANTS_INTEGERS = re.compile(r"\b(Long|Int|indices|integer|index)\b")
ACCEPTS = "; fix: pass inputs the original model accepts"


def integer_hint(message: str, specs) -> str:
    """Token ids given as floats (`--input 1x16`, no dtype) fail inside the model with a message about
    Long/indices: the fix is a dtype on that --input, which the generic fix does not say."""
    bare = [part for spec in specs or [] for part in spec.split(",") if ":" not in part]
    if not bare or not message.endswith(ACCEPTS) or not _WANTS_INTEGERS.search(message):
        return message
    return message[:-len(ACCEPTS)] + f"; fix: token ids are integers: give them a dtype, e.g. --input {bare[0].strip()}:int64"


def unmasked(model, inputs: tuple, keywords: dict) -> tuple[tuple, dict]:
    """Integer example inputs are zeros (token 0); an attention mask of zeros masks every token, so an input whose
    parameter is named like a mask is ones instead (a fully masked example checks softmax over nothing)."""
    import inspect
    try:
        names = [n for n, p in inspect.signature(model.forward).parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []

    def filled(name, value):
        masked = isinstance(value, torch.Tensor) and not value.is_floating_point() and "mask" in (name or "")
        return torch.ones_like(value) if masked else value
    return (tuple(filled(names[i] if i < len(names) else None, v) for i, v in enumerate(inputs)),
            {k: filled(k, v) for k, v in keywords.items()})

