"""The recipe: trace -> match -> rewrite -> validate -> transfer, and its result."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._progress import working
from ._util import machine_memory
from .capture import Capture, Captured, Meta, capture, capture_kept, hint_methods, keep_containers, track
from .errors import ModelError, RuleError, SaveError, SurgeryWarning
from .export import footprint, parse_size, save, save_pretrained
from .match import Plan, match
from .rewrite import InputChange, hold_by_path, rewrite
from .spec import Output, Prune, Rewrite, Rule, flatten, load_rules, refuse_valueless
from .transfer import TransferReport, carry_root_hooks, hold_norms, open_checkpoint, pending_of, refuse_dtensors, register, transfer, with_values
from .validate import GradientFlow, check_module, gradient_flow, validate


@dataclass(kw_only=True)
class SurgeryResult:
    """The new module (regenerated, or the original's class kept) and everything said about how it was made."""

    module: nn.Module                         # a GraphModule, or (keep_class) an instance of the original's class
    report: TransferReport
    plan: Plan
    rules: list[Rule]
    example_inputs: tuple | None = None
    example_kwargs: dict = field(default_factory=dict)  # keyword inputs `module(*example_inputs, **example_kwargs)` needs
    original_inputs: tuple | None = None
    input_changes: list[InputChange] = field(default_factory=list)
    original: Captured | None = None          # the traced original, when one graph holds it all
    shapes: dict[str, Meta] = field(default_factory=dict)  # node name -> shape in the new graph
    capture: Capture | None = None            # every graph and opaque module of the original
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds (`fxsurgery apply --profile`)
    _flow: GradientFlow | None = field(default=None, repr=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should get: parameters that will receive a gradient, each object once.

        Frozen parameters and those a detach cuts off from every output are left out.
        """
        flow = self.gradient_flow.status
        seen, out = set(), []
        for name, p in self.module.named_parameters():
            if flow.get(name) == "trainable" and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def param_groups(self, lr: float, weight_decay: float = 0.0, no_decay=("bias", "norm")) -> list[dict]:
        """Optimizer groups: weight decay for the trainable parameters, none for biases and norms.

        A parameter goes without decay when a `no_decay` word appears in its
        name or in its module's class name (BatchNorm2d, LayerNorm). Membership
        is by identity: a tied parameter is in one group once.
        """
        words = tuple(w.lower() for w in no_decay)
        modules = dict(self.module.named_modules())
        trainable = {id(p) for p in self.trainable_parameters()}
        decay, plain, seen = [], [], set()
        for name, p in self.module.named_parameters():
            if id(p) not in trainable or id(p) in seen:
                continue
            seen.add(id(p))
            owner = type(modules.get(name.rpartition(".")[0])).__name__.lower()
            (plain if any(w in name.lower() or w in owner for w in words) else decay).append(p)
        return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                {"params": plain, "lr": lr, "weight_decay": 0.0}]

    @property
    def gradient_flow(self) -> GradientFlow:
        """Each parameter: trainable, frozen, or cut (requires grad but no gradient can reach it)."""
        if self._flow is None:
            one_graph = self.capture is not None and self.capture.complete
            self._flow = gradient_flow(self.module, self.example_inputs, self.shapes, one_graph=one_graph,
                                       kwargs=self.example_kwargs)
        return self._flow

    @property
    def mode(self) -> str:
        """'kept class LlamaForCausalLM' (keep_class), 'regenerated graph module', or where the model's own forward
        stayed Python (a cache object, data-dependent code): 'LlamaForCausalLM, its forward opaque Python, parts traced'."""
        kept = self.capture is not None and self.capture.kept
        if kept:
            return f"kept class {type(self.module).__name__}"
        if self.capture is not None and "" in self.capture.opaque:  # the root was never regenerated: say so, not only at save
            return f"{type(self.module).__name__}, its forward opaque Python, parts traced"
        return "regenerated graph module"

    def __repr__(self) -> str:
        # the dataclass repr printed every example tensor and captured call: 228 KB for a two-layer Llama
        counts = ", ".join(f"{n} {k}" for k, n in self.report.counts().items() if n)
        n = len(self.plan.matches)
        matches = f" (matches {', '.join(f'{m.index}: {m.count}' for m in self.plan.matches)})" if n else ""
        return (f"SurgeryResult({self.mode}, {n} rule{'' if n == 1 else 's'}{matches}, tensors: {counts or 'none'}; "
                ".summary() says more)")

    def summary(self, brief: bool = False) -> str:
        """The plan, the transfer report by module, the gradient flow and every warning; `brief`: the warnings alone."""
        flow = self.gradient_flow.counts()
        parts = [] if brief else [
            "plan:", self.plan.table(), "", "transfer:", self.report.table(), "",
            f"gradient flow: {flow['trainable']} parameters train, {flow['frozen']} frozen, {flow['cut']} cut off by a detach"
            + (f", {flow['unused']} never read by the forward" if flow["unused"] else "")]
        parts += [f"  {w}" for w in self.gradient_flow.warnings()]
        if self.input_changes:
            parts += ["", "inputs:"] + [f"  {c}" for c in self.input_changes]
        if self.plan.warnings:
            parts += ["", "warnings:"] + [f"  {w}" for w in self.plan.warnings]
        if self.capture is not None and "" in self.capture.opaque and not self.capture.kept:
            why = str(self.capture.opaque[""]).partition("; fix:")[0]
            parts += ["", f"result: {self.mode} ({why}): model.py needs a graph of the whole forward"]
        return "\n".join(parts).strip("\n") if brief else "\n".join(parts)

    @property
    def specialised(self) -> dict[str, dict[int, str]]:
        """{input: {dim: why}}: the input dims the result accepts at their example size only."""
        return self.capture.specialised() if self.capture is not None else {}

    def coverage(self) -> dict:
        """Traced graphs, opaque modules with the reason each stays Python, share of parameters in graphs."""
        return self.capture.coverage()

    def to_dict(self) -> dict:
        def shapes(inputs):
            return [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs or ()]
        return {
            "mode": self.mode,
            "rules": [{"rule": i, "text": str(r), "origin": str(r.origin)} for i, r in enumerate(self.rules, start=1)],
            "matches": self.plan.to_dict(),
            "warnings": list(self.plan.warnings),
            "inputs": {"before": shapes(self.original_inputs), "after": shapes(self.example_inputs),
                       "changes": [str(c) for c in self.input_changes]},
            "report": self.report.to_dict(),
            "gradient_flow": self.gradient_flow.to_dict(),
            "coverage": self.capture.coverage() if self.capture is not None else None,
            "specialised": {name: {str(d): why for d, why in dims.items()} for name, dims in self.specialised.items()},
        }

    def footprint(self, max_shard_size: int | str = "5GB") -> dict:
        """What save() would write (bytes, shards) and its predicted peak memory above imports, from shapes alone."""
        return footprint(self.module, pending_of(self.module), parse_size(max_shard_size))

    def footprint_text(self, max_shard_size: int | str = "5GB") -> str:
        f = self.footprint(max_shard_size)
        how = "streamed shard by shard" if f["streamed"] else "from memory"
        text = (f"output: {_gb(f['output_bytes'])} in {f['shards']} file{'s' if f['shards'] > 1 else ''} "
                f"(largest {_gb(f['largest_shard_bytes'])}); predicted peak memory above imports: "
                f"{_gb(f['predicted_peak_bytes'])} ({how})")
        memory = machine_memory()
        if memory and f["predicted_peak_bytes"] > memory:  # the plan may be for a bigger machine: said, not refused
            fix = ("a smaller --max-shard-size (max_shard_size=), or a machine with more memory" if f["streamed"] else
                   "build the model on the meta device and stream its weights (--weights FILE --stream)")
            text += f"\nwarning: that is more than this machine's memory ({_gb(memory)}): the run would be killed here; fix: {fix}"
        return text

    def save(self, directory: str | os.PathLike, *, force: bool = False, formats=(), extra=None,
             max_shard_size: int | str = "5GB", ranks: bool = False) -> Path:
        """Write model.py + model.safetensors + surgery.json (atomically), plus any `formats`
        ("pt2", "onnx", "torchscript"), each verified on the example inputs, and `extra`
        files ({name: write(path)}), listed as fxsurgery's own. Weights above `max_shard_size`
        (bytes, or "5GB", "500MB") are written as model-0000k-of-0000n.safetensors shards with an index.
        A kept transformers model is written by its own `save_pretrained` (plus surgery.json), which
        `formats=("hf",)` demands: `from_pretrained` reloads it without fxsurgery.
        `ranks=True`: this process is one of torchrun's ranks (RANK, WORLD_SIZE set), each of which
        runs the same surgery and calls save: each writes its share of the shards, rank 0 the rest."""
        pretrained, formats = self.check_formats(formats)
        if pretrained:
            with working("save"):  # a large model's weights take a while to write and hash
                return save_pretrained(self.module, directory, force=force, record=self.to_dict(), max_shard_size=max_shard_size,
                                       lazy=pending_of(self.module), ranks=ranks, original=self.capture.model)
        with working("save"):
            return save(self.module, directory, force=force, record=self.to_dict(), formats=formats,
                        example_inputs=self.example_inputs, extra=extra, max_shard_size=max_shard_size,
                        lazy=pending_of(self.module), static=self._static_dims(), ranks=ranks)

    def check_formats(self, formats) -> tuple[bool, tuple]:
        """(saved by save_pretrained, the other formats) for `save(formats=...)`; refuses what this result cannot write."""
        pretrained = self.capture is not None and self.capture.kept and hasattr(self.module, "save_pretrained")
        if "hf" in formats:
            if not pretrained:
                raise SaveError(f"format hf: the result is a {self.mode}, which has no save_pretrained; fix: apply to a "
                                "transformers model (kept as its class by default), or leave format hf out")
            formats = tuple(f for f in formats if f != "hf")
        if pretrained and formats:
            raise SaveError(f"formats {', '.join(formats)}: a kept {type(self.module).__name__} is saved by its own "
                            "save_pretrained; fix: leave formats out, or apply with keep_class=False (--no-keep-class)")
        if formats and pending_of(self.module):
            raise SaveError(f"formats {', '.join(formats)}: a streamed result holds no weights in memory to export; "
                            "fix: leave formats out, or apply without stream")
        run = [f for f in formats if f != "dcp"]  # the others are checked by running them on the example
        if run and self.example_inputs is None:
            raise SaveError(f"cannot write {run[0]} without example inputs; fix: pass example_inputs (--input)")
        return pretrained, tuple(formats)

    def _static_dims(self) -> list | None:
        """Per example input, the dims exports keep static: those capture specialised (tensor inputs
        in order, as the graph takes them); None when the capture was exact (dynamic_shapes=None)."""
        root = self.capture.regions[0] if self.capture is not None and self.capture.regions else None
        if root is None or root.path or root.dynamic is None:
            return None
        pinned = self.capture.specialised(ones=False)   # a dim that only size 1 branches on stays dynamic
        names = iter(root.input_names())
        return [set(pinned.get(next(names, ""), {})) if isinstance(x, torch.Tensor) else set()
                for x in self.example_inputs or ()]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def apply(model: nn.Module, rules, example_inputs=None, *, example_kwargs: dict | None = None,
          params: dict | None = None, allow=(),
          strict: bool = False, leaf_types=(), leaf_paths=(), copy: bool = True, weights=None,
          keep_class: bool | None = None, modes: bool = True, stream: bool = False,
          dynamic_shapes="auto") -> SurgeryResult:
    """Apply `rules` to `model` (never modified) and return the regenerated module.

    `keep_class=True` returns an instance of the model's own class instead (a
    copy): its code runs as written and rules swap, wrap or remove the modules
    it calls; a configuration follows the edit (`num_hidden_layers`,
    `num_labels`). `None` (default): kept for transformers `PreTrainedModel`s.

    `example_kwargs` are the example call's keyword inputs (`attention_mask=`,
    `labels=`): the result takes the forward's parameters by position and by
    keyword, with their defaults, and refuses (naming it) an argument the
    example call did not cover, e.g. a tensor where the example had None.

    `copy=False` hands the original's tensors to the new module instead of
    copying them (half the memory); the original then refuses to run.
    `weights` (a .safetensors file, a sharded *.index.json, or a weights-only
    .pt) gives the original's values, read tensor by tensor into the new
    layout: build the original inside `fxs.empty_weights()` and a large model
    never needs its memory twice. What the original decides from
    `self.training` (dropout, stochastic depth, `if self.training:`), the result
    decides from its own mode at run time (capture/_modes.py); `modes=False` keeps the
    captured mode's decisions as constants (a kept class runs its own code, so its modes are live anyway).
    `stream=True` (with `weights`): nothing is materialised; the tensors read from
    the checkpoint stay on meta in `result.module` and flow one at a time into the
    output shards of `result.save`.
    Where the forward's Python needs a size (`if seq_len > 4:`), `dynamic_shapes="auto"` guards
    that decision alone and every other size stays general (`result.specialised` lists the dims
    a decision pins); None guards every input's whole example shape; a torch.export-style spec
    ({input name or position: {dim: name}}) must stay dynamic where declared, static elsewhere.

    >>> result = apply(resnet18(), [Replace("fc", new(nn.Linear, out_features=10))],
    ...                example_inputs=(torch.randn(1, 3, 224, 224),))
    >>> result.module(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"apply needs a torch.nn.Module, got a {type(model).__name__}; fix: pass the model object, e.g. "
                         "fxs.apply(torchvision.models.resnet18(), rules)")
    clock = _Stopwatch()
    # the result is a model to train or run as any other: called under torch.inference_mode(), its tensors
    # would be inference tensors (never trainable) and capture's fake and meta runs would fail
    with _gc_deferred(), torch.inference_mode(False):
        with clock("rules"):
            rule_list = flatten(rules, lambda path: load_rules(path, params=params, allow=allow))
        refuse_dtensors(model)
        refuse_valueless(rule_list)
        ranking = next((r for r in rule_list if isinstance(r, Prune) and r.indices is None), None)
        if weights is not None and ranking is not None:  # it ranks channels by values the model may not hold
            if stream:
                raise RuleError(f"{ranking.origin}: '{ranking}' ranks channels by their values, which a streamed surgery reads "
                                "only when it writes them; fix: give the channels to remove (channels=[...]), or apply without stream")
            with working("load weights"):
                model, weights = with_values(model, open_checkpoint(weights)), None
        kept = _is_pretrained(model) if keep_class is None else keep_class
        # modules a pattern must see called as one (timm's BatchNormAct2d for fold_bn)
        leaf_paths = (*leaf_paths, *(p for r in rule_list if isinstance(r, Rewrite) for p in r.pattern.leaves(model)))
        with clock("capture"):
            captured = (capture_kept(model, example_inputs, example_kwargs) if kept
                        else capture(model, example_inputs, example_kwargs, leaf_types=leaf_types, leaf_paths=leaf_paths,
                                     dynamic_shapes=dynamic_shapes))
        # what the original decides from self.training, the result decides at run time (capture/_modes.py);
        # where the code itself differs by mode, the surgery is also made in the other mode
        with clock("modes"):
            other = dict(example_kwargs=example_kwargs, strict=strict, leaf_types=leaf_types, leaf_paths=leaf_paths,
                         weights=weights, modes=False, keep_class=False, stream=stream, dynamic_shapes=dynamic_shapes)
            live = track(model, captured, lambda flipped, call=(example_inputs, example_kwargs): _quiet(
                apply, flipped, rule_list, call[0], **{**other, "example_kwargs": call[1]})) if modes and not kept else None
        with clock("match"):
            plan = match(captured, rule_list)                 # read-only
        with clock("rewrite"):
            rewritten = rewrite(captured, plan)               # the only stage that edits structure
        with clock("validate"):
            validate(rewritten)
        with clock("transfer"):
            module, report = transfer(rewritten, strict=strict, copy=copy, weights=weights, stream=stream)
            if live is not None:
                pending = {**pending_of(module), **(pending_of(live.other.module) if live.other is not None else {})}
                module = live.keep(module, plan)
                register(module, pending)
                if live.other is not None:
                    report.join_mode(live.other.report, {*dict(module.named_parameters(remove_duplicate=False)),
                                                         *dict(module.named_buffers(remove_duplicate=False))})
            hold_norms(module, rewritten)  # after the modes are live: a held BatchNorm's calls stay in eval mode in both
            hold_by_path(module)  # .train() leaves them in eval mode, and any BatchNorm put in their place
            keep_containers(module, model)  # result.features[0], len(result.encoder.layer) as on the original
            hint_methods(module, model)  # result.forward_features(x) says why it is gone, and the fix
            if not kept:  # a graph holds the forward, not the call around it: the root's hooks go on the result's root
                changed = next((m.label for m in plan.matches if isinstance(m.rule, Output) and m.count), "")
                changed = changed or next((plan.matches[c.rule - 1].label for c in rewritten.input_changes()), "")
                plan.warnings += carry_root_hooks(model, module, changed)
        with clock("validate"):
            # where opaque code joins the graphs; its fake run gives the gradient flow too
            checked_flow = check_module(module, rewritten, captured.example_kwargs)
        root = rewritten.root
        result = SurgeryResult(module=module, report=report, plan=plan, rules=rule_list,
                               example_inputs=rewritten.example_inputs(), example_kwargs=dict(captured.example_kwargs),
                               original_inputs=captured.example_inputs,
                               input_changes=rewritten.input_changes(),
                               original=_one_graph(captured),
                               shapes=root.shapes if root is not None else {}, capture=captured, timings=clock.times,
                               _flow=checked_flow)
        with clock("gradient flow"):
            flow = result.gradient_flow
    for warning in plan.warnings + flow.warnings():
        warnings.warn(warning, SurgeryWarning, stacklevel=2)
    return result


class _Stopwatch:
    """Seconds per stage, summed over the stage's pieces."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _gc_deferred():
    """No cyclic garbage collection during a surgery.

    A surgery allocates millions of small objects that live until it ends (nodes,
    their argument tuples, fake tensors); each full collection walks all of them,
    and the number of collections grows with the graph, so without this the
    pipeline grows superlinearly with the node count. Cycles made meanwhile are
    collected by the next collection after the surgery."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_pretrained(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (by name: fxsurgery never imports transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _one_graph(captured: Capture) -> Captured | None:
    """The graph of the whole original, when one graph holds it (called as the model is, or through
    the adapter that restores its call form); None when opaque code or a kept class runs it."""
    regions = captured.regions
    if len(regions) == 1 and regions[0].path == "" and not captured.opaque and not captured.kept:
        return regions[0]
    return None


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        return fn(*args, **kwargs)

