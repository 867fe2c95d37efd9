"""The robustness figures the README states, written to docs/robustness.json on request only.

    FXSURGERY_WRITE_FIGURES=1 python -m pytest tests/test_figures.py -p no:randomly
    FXSURGERY_WRITE_FIGURES=1 FXSURGERY_FUZZ_EXAMPLES=1000 python -m pytest tests/test_figures.py -p no:randomly

It runs every case of the bad-input corpus (tests/test_bad_inputs.py) and
both fuzzed properties (tests/test_fuzz.py), counts what was tried and what
was handled as the contract says, and writes the counts, and the README's
sentence that states them. Without FXSURGERY_WRITE_FIGURES=1 it is skipped
and writes nothing; FXSURGERY_FIGURES_PATH writes the file elsewhere (and
leaves the README alone). A test that always runs checks that the README
states what docs/robustness.json holds.
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

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "docs" / "robustness.json"
FIGURES = Path(os.environ.get("FXSURGERY_FIGURES_PATH") or DEFAULT)
README = ROOT / "README.md"
BEGIN, END = "<!-- robustness figures: written by tests/test_figures.py -->", "<!-- end of robustness figures -->"
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

    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures.update({
        "fxsurgery": fxs.__version__,
        "torch": torch.__version__,
        "bad_inputs": {"tried": len(bad.CASES), "handled": len(bad.CASES) - len(failing), "failing": failing},
    })
    # the CI run and the long run are kept side by side; each write replaces its own
    figures.setdefault("fuzz", {})["long" if fuzz.DEEP else "ci"] = {
        "examples_requested": fuzz.DEEP or "CI default (FXSURGERY_FUZZ_EXAMPLES unset)", "properties": properties,
        "rules_examples_refused_with_a_typed_error": fuzz.RUN["failed_cleanly"] - refused}
    figures["fuzz"] = {k: v for k, v in figures["fuzz"].items() if k in ("ci", "long")}
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    assert json.loads(FIGURES.read_text())["bad_inputs"]["tried"] == len(bad.CASES)
    if FIGURES == DEFAULT:
        README.write_text(with_figures(README.read_text(), figures), encoding="utf-8")


def render(figures: dict) -> str:
    """The README's robustness sentence, from the figures."""
    b = figures["bad_inputs"]
    runs = []
    for key, what in (("ci", "in CI"), ("long", "in the long run (FXSURGERY_FUZZ_EXAMPLES=1000)")):
        run = figures.get("fuzz", {}).get(key)
        if run:
            props = run["properties"]
            held = all(p["outcome"] == "held" for p in props.values())
            total = sum(p["examples_run"] for p in props.values())
            runs.append(f"{total} fuzz examples {what}, every property {'held' if held else 'NOT held'} "
                        f"({run['rules_examples_refused_with_a_typed_error']} rule lists refused with a typed error)")
    return (f"Measured by `tests/test_figures.py` (fxsurgery {figures['fxsurgery']}, torch {figures['torch']}): "
            f"{b['handled']} of {b['tried']} bad inputs handled as the contract says; " + "; ".join(runs)
            + ". No run lost data, wrote a partial output or executed code from a data file.")


def with_figures(readme: str, figures: dict) -> str:
    head, rest = readme.split(BEGIN, 1)
    return head + BEGIN + "\n" + render(figures) + "\n" + END + rest.split(END, 1)[1]


def test_readme_states_the_figures_the_suite_wrote():
    figures = json.loads(DEFAULT.read_text())
    text = README.read_text()
    assert with_figures(text, figures) == text, "README figures differ from docs/robustness.json: run the command at the top"
