"""The robustness figures the README states, written to docs/robustness.json on request only.

    FXSURGERY_WRITE_FIGURES=1 python -m pytest tests/test_figures.py -p no:randomly
    FXSURGERY_WRITE_FIGURES=1 FXSURGERY_FUZZ_EXAMPLES=1000 python -m pytest tests/test_figures.py -p no:randomly

It runs every case of the bad-input corpus (tests/test_bad_inputs.py) and
both fuzzed properties (tests/test_fuzz.py), counts what was tried and what
was handled as the contract says, and writes the counts. Without
FXSURGERY_WRITE_FIGURES=1 it is skipped and writes nothing;
FXSURGERY_FIGURES_PATH writes the file elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import test_bad_inputs as bad
import test_fuzz as fuzz
import torch
from test_bad_inputs import scratch  # noqa: F401  (the corpus's weights files, a fixture)

import fxsurgery as fxs

FIGURES = Path(os.environ.get("FXSURGERY_FIGURES_PATH") or Path(__file__).resolve().parent.parent / "docs" / "robustness.json")
WRITE = os.environ.get("FXSURGERY_WRITE_FIGURES") == "1"


@pytest.mark.skipif(not WRITE, reason="set FXSURGERY_WRITE_FIGURES=1 to write docs/robustness.json")
def test_write_robustness_figures(tmp_path, scratch):  # noqa: F811
    failing = []
    for i, case in enumerate(bad.CASES):
        work = tmp_path / f"case{i}"
        work.mkdir()
        try:
            bad.check_case(case, work, scratch)
        except Exception as exc:  # noqa: BLE001  (an assertion, or a crash of the command itself)
            failing.append({"case": case.id, "why": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__})

    properties = {}
    refused = fuzz.RUN["failed_cleanly"]
    for name, test in (("rules", fuzz.test_rules_keep_the_invariants), ("identity", fuzz.test_no_rules_is_the_identity)):
        before = fuzz.RUN[name]
        try:
            test()
            outcome = "held"
        except Exception as exc:  # noqa: BLE001  (a falsified property is a figure, not a crash)
            outcome = f"falsified: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
        properties[name] = {"examples_run": fuzz.RUN[name] - before, "outcome": outcome}

    figures = {
        "fxsurgery": fxs.__version__,
        "torch": torch.__version__,
        "bad_inputs": {"tried": len(bad.CASES), "handled": len(bad.CASES) - len(failing), "failing": failing},
        "fuzz": {"examples_requested": fuzz.DEEP or "CI default (FXSURGERY_FUZZ_EXAMPLES unset)", "properties": properties,
                 "rules_examples_refused_with_a_typed_error": fuzz.RUN["failed_cleanly"] - refused},
    }
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    assert json.loads(FIGURES.read_text())["bad_inputs"]["tried"] == len(bad.CASES)
