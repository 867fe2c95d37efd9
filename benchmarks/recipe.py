"""fxs.apply's recipe, stage by stage, each stage timed.

This is fxsurgery/pipeline.py's `apply` with a clock between the stages; if
that recipe changes, this must follow it (the smoke test compares the two).
"""

from __future__ import annotations

import time

from torch import nn

from fxsurgery.capture import capture
from fxsurgery.match import match
from fxsurgery.pipeline import _gc_deferred
from fxsurgery.rewrite import rewrite
from fxsurgery.spec import flatten, load_rules
from fxsurgery.transfer import transfer
from fxsurgery.validate import check_module, validate

STAGES = ("capture", "match", "rewrite", "validate", "transfer", "check")


def run_stages(model: nn.Module, rules, example_inputs, *, keep: list | None = None) -> dict[str, float]:
    """Seconds per stage of one fxs.apply; the built module is appended to `keep` if given."""
    times = {}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    # as apply: no cyclic collection walks the surgery's objects midway
    with _gc_deferred():
        rule_list = flatten(rules, lambda path: load_rules(path))
        captured = capture(model, example_inputs)
        lap("capture")
        plan = match(captured, rule_list)
        lap("match")
        rewritten = rewrite(captured, plan)
        lap("rewrite")
        rewritten = validate(rewritten)
        lap("validate")
        module, _report = transfer(rewritten)
        lap("transfer")
        check_module(module, rewritten)  # only does work where opaque code joins graphs
        lap("check")
    if keep is not None:
        keep.append(module)
    return times


def prepared(model: nn.Module, rules, example_inputs):
    """Everything before the transfer stage, untimed: (rewritten, validated) for transfer alone."""
    rule_list = flatten(rules, lambda path: load_rules(path))
    captured = capture(model, example_inputs)
    return validate(rewrite(captured, match(captured, rule_list)))
