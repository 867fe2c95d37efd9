"""Other formats beside model.py: torch.export (pt2), ONNX, TorchScript.

Each is written, loaded back with its own runtime and run on the example
inputs; the result must match the module (1e-5, ONNX 1e-4) or nothing is
written. A format that cannot express the model says why, in one line.
"""

from __future__ import annotations

import contextlib
import inspect
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




def dynamic_spec(inputs: tuple, static: list | None):
    """torch.export's dynamic_shapes for `inputs`: every dim of every tensor `Dim.AUTO` (torch keeps it
    dynamic where the graph allows) except those in `static` (a set of dims per input); None: all static."""
    if static is None:
        return None
    return tuple({d: torch.export.Dim.AUTO for d in range(x.dim()) if d not in (static[i] if i < len(static) else ())}
                 if isinstance(x, torch.Tensor) else None for i, x in enumerate(inputs))


def variants(inputs: tuple, static: list | None) -> list[tuple[str, tuple]]:
    """(what changed, inputs) with one dim of the example grown by one, for each dim that may vary:
    the exported artefact is run there too. Dims of the same position and size grow together (ids, mask)."""
    if static is None:
        return []
    groups: dict = {}
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            for d, size in enumerate(x.shape):
                if d not in (static[i] if i < len(static) else ()):
                    groups.setdefault((d, int(size)), []).append(i)
    out = []
    for (d, size), members in groups.items():
        grown = list(inputs)
        for i in members:
            shape = list(inputs[i].shape)
            shape[d] = size + 1
            grown[i] = torch.cat([inputs[i], inputs[i].narrow(d, 0, 1)], dim=d) if inputs[i].shape[d] else inputs[i].new_zeros(shape)
        out.append((f"dim {d} of input {', '.join(map(str, members))}: {size + 1}", tuple(grown)))
    return out


def _bound(gm: fx.GraphModule, dynamic):
    """`dynamic` shaped as torch.export binds it: a forward taking `*args` (the call-form adapter) takes it whole."""
    if dynamic is None:
        return None
    try:
        params = list(inspect.signature(gm.forward).parameters.values())
    except (TypeError, ValueError):
        return dynamic
    if params and params[0].kind is params[0].VAR_POSITIONAL:
        return {params[0].name: dynamic}
    return dynamic


def _write(fmt: str, gm: fx.GraphModule, path: Path, inputs: tuple, dynamic=None):
    """Write one format and return a callable that runs what was written."""
    dynamic = _bound(gm, dynamic)
    if fmt == "pt2":
        program = torch.export.export(gm, inputs, dynamic_shapes=dynamic)
        torch.export.save(program, str(path))
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings(), _numbers_annotated(gm, inputs):
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
        torch.onnx.export(gm, inputs, str(path), dynamo=True, verbose=False, external_data=large, output_names=names,
                          dynamic_shapes=dynamic)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, _tensors(args))}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    return run


@contextlib.contextmanager
def _numbers_annotated(gm: fx.GraphModule, inputs: tuple):
    """The graph's number parameters annotated with their type while TorchScript compiles it, then as before.

    TorchScript takes an unannotated parameter for a Tensor and refuses `k=2` as its default; the
    type is the default's, or the example value's where there is no default.
    """
    typed = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.args[0] if node.args else inputs[i] if i < len(inputs) else None
        if node.type is None and type(value) in (bool, int, float, str):
            node.type = type(value)
            typed.append(node)
    if typed:
        gm.recompile()
    try:
        yield
    finally:
        for node in typed:
            node.type = None
        if typed:
            gm.recompile()


def export_as(fmt: str, gm: fx.GraphModule, work: Path, example_inputs: tuple | None, static: list | None = None) -> dict:
    """Write `gm` in `fmt` into `work`, verified on `example_inputs`; a record of what was written.

    pt2 and ONNX keep every input dim dynamic except those `static` lists (a set of dims per input;
    None: all static), and are also run with each such dim grown by one: `dynamic` in the record
    lists those where the artefact matched the module (torch may still fix a dim the graph needs fixed).
    """
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
                runner = _exported(fmt, gm, path, tuple(example_inputs), static)
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
    record = {"file": FORMATS[fmt], "max_abs_diff": worst}
    numbers = [(n.target, v) for n, v in zip(gm.graph.find_nodes(op="placeholder"), example_inputs) if type(v) in (int, float)]
    if numbers and fmt != "torchscript":  # torch.export and ONNX hold a number input as the example's value
        record["fixed"] = dict(numbers)
    if fmt != "torchscript" and static is not None:
        record["dynamic"] = _dynamic(gm, runner, tuple(example_inputs), static, TOLERANCE[fmt])
    return record


def _exported(fmt: str, gm: fx.GraphModule, path: Path, inputs: tuple, static: list | None):
    """Write `gm` traced on `inputs`, except that dims left general and of size 1 there are traced at 2:
    torch.export fixes a size-1 dim (0/1 specialisation), and a model captured on one example
    (batch 1) would export for batch 1 only. The artefact still takes size 1; where the wider
    trace fails, the example's own shapes are used."""
    if fmt == "torchscript":
        return _write(fmt, gm, path, inputs, None)
    wider = _widened(inputs, static)
    if wider is not inputs:
        try:
            with torch.no_grad():
                gm(*wider)
            return _write(fmt, gm, path, wider, dynamic_spec(wider, static))
        except Exception:
            pass
    return _write(fmt, gm, path, inputs, dynamic_spec(inputs, static))


def _widened(inputs: tuple, static: list | None) -> tuple:
    if static is None:
        return inputs
    out, changed = list(inputs), False
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            for d, size in enumerate(x.shape):
                if size == 1 and d not in (static[i] if i < len(static) else ()):
                    out[i] = x = torch.cat([x, x], dim=d)
                    changed = True
    return tuple(out) if changed else inputs


def _dynamic(gm: fx.GraphModule, runner, inputs: tuple, static: list, tolerance: float) -> list[str]:
    """The grown-dim variants on which the written artefact runs and matches the module."""
    kept = []
    was_training = gm.training
    gm.eval()
    try:
        for what, grown in variants(inputs, static):
            with torch.no_grad():
                try:
                    expected = _tensors(gm(*grown))
                except Exception:
                    continue  # the module itself is specialised there (a guard): nothing to compare
                try:
                    got = _tensors(runner(*grown))
                except Exception:
                    continue
            if len(got) == len(expected) and all(
                    g.shape == e.shape and (not e.numel() or float((g.float() - e.float()).abs().max()) <= tolerance)
                    for g, e in zip(got, expected)):
                kept.append(what)
    finally:
        gm.train(was_training)
    return kept
