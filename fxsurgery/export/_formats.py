"""Other formats beside model.py: torch.export (pt2), ONNX, TorchScript.

Each is written, loaded back with its own runtime and run on the example
inputs; the result must match the module (1e-5, ONNX 1e-4) or nothing is
written. A format that cannot express the model says why, in one line.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import fx

from .._util import first_line
from ..errors import SaveError
from ._dcp import write_dcp

FORMATS = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
TOLERANCE = {"pt2": 1e-5, "onnx": 1e-4, "torchscript": 1e-5}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def output_names(value, prefix: str = "") -> list[str]:
    """ONNX names for a module's outputs, after what it returns: `output` for one tensor, the keys of a dict
    (`c3`, `c4`), `output_0`, `output_1` for a tuple; in the order `_tensors` lists them."""
    if isinstance(value, torch.Tensor):
        return [prefix or "output"]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in output_names(v, f"{prefix or 'output'}_{i}")]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in output_names(v, f"{prefix}_{k}" if prefix else str(k))]
    return []


def _write(fmt: str, gm: fx.GraphModule, path: Path, inputs: tuple):
    """Write one format and return a callable that runs what was written."""
    if fmt == "pt2":
        program = torch.export.export(gm, inputs)
        torch.export.save(program, str(path))
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit announces its own deprecation
            torch.jit.save(torch.jit.script(gm), str(path))
            return torch.jit.load(str(path))
    try:
        import onnxruntime
    except ImportError:
        raise SaveError("cannot write ONNX: onnxruntime is not installed; fix: pip install 'fxsurgery[onnx]'") from None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # One file unless the weights pass protobuf's 2 GB limit.
        large = sum(t.numel() * t.element_size() for t in gm.state_dict().values()) > 1.5e9
        with torch.no_grad():
            names = output_names(gm(*inputs))   # else ONNX names outputs after the last op (`linear`)
        torch.onnx.export(gm, inputs, str(path), dynamo=True, verbose=False, external_data=large, output_names=names)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, _tensors(args))}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    return run


def export_as(fmt: str, gm: fx.GraphModule, work: Path, example_inputs: tuple | None) -> dict:
    """Write `gm` in `fmt` into `work`, verified on `example_inputs`; a record of what was written."""
    if fmt == "dcp":  # weights only: checked by reading them back, not by running them
        return write_dcp(gm, work)
    if fmt not in FORMATS:
        raise SaveError(f"unknown format {fmt!r}; fix: use one of {', '.join(FORMATS)}, dcp")
    if example_inputs is None:
        raise SaveError(f"cannot write {fmt} without example inputs; fix: pass example_inputs (--input)")
    path = work / FORMATS[fmt]
    was_training = gm.training
    gm.eval()  # exported artefacts are for inference
    try:
        with torch.no_grad():
            expected = _tensors(gm(*example_inputs))
            try:
                runner = _write(fmt, gm, path, tuple(example_inputs))
                got = _tensors(runner(*example_inputs))
            except SaveError:
                raise
            except Exception as exc:
                raise SaveError(f"cannot write {fmt}: {_first_line(exc)}; fix: save without --format {fmt}, or make that part traceable") from None
    finally:
        gm.train(was_training)
    if len(got) != len(expected):
        raise SaveError(f"{fmt} export returns {len(got)} tensors where the module returns {len(expected)}; fix: save without --format {fmt}")
    worst = max((float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected) if e.numel()), default=0.0)
    if worst > TOLERANCE[fmt]:
        raise SaveError(f"{fmt} export differs from the module by {worst:.2e} (more than {TOLERANCE[fmt]:.0e}); fix: save without --format {fmt}")
    return {"file": FORMATS[fmt], "max_abs_diff": worst}
