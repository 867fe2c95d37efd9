"""What general sizes cost at capture: guards on decisions against guards on whole shapes.

`capture(model, inputs)` (dynamic_shapes="auto": each size decision the
forward's Python makes is asserted in the graph, and the graph is run again on
fake inputs with each input dim changed to find which dims a decision pins)
is timed against `capture(..., dynamic_shapes=None)` (one guard on each
input's whole example shape, no probing: what capture did before), interleaved
rounds, median ratio per model. Models traced by plain torch.fx make no
decision and cost the same either way; the corpus models below are those whose
code decides on sizes. Where a decision pins a dim of size 1 (hf/gpt2 and
hf/llama at batch 1), "auto" also captures again at 2 and checks that capture
against the first on the example (two real forward passes): `specialised`
lists the dims left pinned after that.
"""

from __future__ import annotations

import warnings

from fxsurgery.capture import capture

from .common import interleave, log, medians
from .module_speed import _corpus, _torchvision

MODELS = {"resnet18": _torchvision("resnet18", 64),
          **{name: _corpus(name) for name in ("hf/bert", "hf/gpt2", "hf/llama", "hf/t5", "hf/vit", "hf/whisper",
                                              "timm/mobilevitv2_050", "timm/crossvit_9_240")}}


def run(quick: bool = False, rounds: int | None = None, models: list[str] | None = None) -> dict:
    warnings.simplefilter("ignore")
    rounds = rounds or (1 if quick else 5)
    rows = {}
    for name in models or list(MODELS):
        model, inputs = MODELS[name]()
        runs = interleave({"shape_guards": lambda m=model, x=inputs: capture(m, x, dynamic_shapes=None),
                           "decision_guards": lambda m=model, x=inputs: capture(m, x)}, rounds)
        before, after = medians(runs["shape_guards"])["total"], medians(runs["decision_guards"])["total"]
        captured = capture(model, inputs)
        decisions = sum(len(r.decisions) for r in captured.regions)
        pinned = {n: sorted(dims) for n, dims in captured.specialised().items()}
        rows[name] = {"shape_guards_s": before, "decision_guards_s": after, "ratio": after / before,
                      "decisions": decisions, "specialised": pinned, "rounds": rounds}
        log(f"capture {name}: decision guards / shape guards {after / before:.3f} ({decisions} decisions)")
    ratios = [r["ratio"] for r in rows.values()]
    return {"benchmark": "capture_dynamic", "models": rows, "ratio_max": max(ratios) if ratios else None}
