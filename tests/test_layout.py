"""The tree stays the pipeline: stages import downward, the API is a visible diff, files stay small.

import-linter and ruff run here, so `pytest` (the README's test command and
CI) fails on a new import cycle, an upward import or a lint error; each
check is also shown to fail on a deliberately broken copy of the package.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fxsurgery

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxsurgery"
STAGES = ["spec", "capture", "match", "rewrite", "validate", "transfer", "export", "views", "cli"]

# The public API. A change here is a change of the contract: update it on purpose.
API = [
    "AdaptInputChannels", "AddLoRA", "Chain", "Checkpoint", "Delete", "Detach", "DropDropout", "FoldBatchNorm",
    "FoldLinearBatchNorm", "Freeze", "FxsError", "Insert", "Layers", "MatchError", "ModeError", "ModelError", "Output", "Pattern", "Prune", "Replace",
    "Rewrite", "RewriteError", "RuleError", "RuleSet", "SaveError", "SurgeryResult", "SurgeryWarning", "SwapActivation",
    "TraceError", "TransferError", "TransferReport", "ValidateError", "__version__", "apply", "calls", "diff",
    "empty_weights", "load", "load_rules", "map_weights", "new", "pattern", "save", "transfer",
]


def test_public_api_snapshot():
    assert sorted(fxsurgery.__all__) == API
    assert all(hasattr(fxsurgery, name) for name in API)
    # reprs and error messages name the public path, not the engine module behind it
    assert repr(fxsurgery.AddLoRA) == "<class 'fxsurgery.AddLoRA'>"
    assert fxsurgery.MatchError.__module__ == "fxsurgery"


def test_top_level_holds_the_recipe_and_stages_hold_the_rest():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "_progress.py", "_util.py", "errors.py", "pipeline.py", "version.py"]
    assert len(modules) <= 8
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:  # engine modules are private; the stage's __init__ is its surface
        inner = [p.name for p in (PACKAGE / stage).glob("*.py")]
        assert all(n.startswith("_") for n in inner), (stage, inner)


def test_no_file_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed; fix: pip install -e '.[test]'")
    return path


def test_import_layers_hold():
    done = _run([_tool("lint-imports")], ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_ruff_is_clean():
    done = _run([_tool("ruff"), "check", "."], ROOT)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.fixture
def broken_copy(tmp_path):
    """A copy of the package and its configuration, to break on purpose."""
    shutil.copytree(PACKAGE, tmp_path / "fxsurgery", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_import_linter_catches_a_cycle_and_an_upward_import(broken_copy):
    trace = broken_copy / "fxsurgery" / "capture" / "_trace.py"
    trace.write_text(trace.read_text() + "\nfrom ..views import diff  # noqa: E402,F401\n")
    editor = broken_copy / "fxsurgery" / "rewrite" / "_edited.py"
    editor.write_text(editor.read_text() + "\nfrom ._editor import Rewriter  # noqa: E402,F401\n")
    env = {**os.environ, "PYTHONPATH": str(broken_copy)}
    done = _run([_tool("lint-imports")], broken_copy, env)
    assert done.returncode == 1
    assert "fxsurgery.capture is not allowed to import fxsurgery.views" in done.stdout
    assert "- fxsurgery.capture._trace -> fxsurgery.views" in done.stdout
    assert "No cycles are allowed in fxsurgery.rewrite." in done.stdout
    assert "Contracts: 1 kept, 2 broken." in done.stdout


def test_ruff_catches_a_lint_error(broken_copy):
    util = broken_copy / "fxsurgery" / "_util.py"
    util.write_text("import fnmatch\n" + util.read_text())  # a module _util.py does not import
    done = _run([_tool("ruff"), "check", "fxsurgery"], broken_copy)
    assert done.returncode == 1
    assert "fxsurgery/_util.py:1:8: F401" in done.stdout


def test_readme_stage_table_names_every_module():
    rows = {line.split("|")[1].strip(): line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in STAGES}
    missing = [f"{stage}/{p.stem}" for stage in STAGES for p in (PACKAGE / stage).glob("_*.py") if not p.stem.startswith("__")
               if f"`{p.stem}`" not in rows.get(stage, "")]
    assert sorted(rows) == sorted(STAGES) and missing == []
    assert "docs/architecture.md" in (ROOT / "README.md").read_text(encoding="utf-8")
