"""The command line: demo, apply, inspect, check, and bad input."""

import json
import os

import pytest
import torch
from conftest import RULES, cli, cli_process
from torch import nn

import fxsurgery as fxs
from fxsurgery.errors import bounded

RESNET = "torchvision.models:resnet18"


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_demo_writes_a_reloadable_model(tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = cli("demo", "-o", out)
    assert code == 0 and stderr == ""
    assert sorted(os.listdir(out)) == ["demo.txt", "diff.html", "graph.json", "model.py", "model.safetensors", "surgery.json"]
    assert 'data-node="avgpool_dropout"' in (out / "diff.html").read_text()
    record = json.loads((out / "surgery.json").read_text())
    assert record["report"]["counts"] == {"transferred": 120, "adapted": 0, "new": 2, "dropped": 2, "frozen": 45}
    assert [m["matches"] for m in record["matches"]] == [1, 30, 1, 1]
    assert "before: 11,689,512 parameters, 11,689,512 trainable; after: 11,181,642 parameters, 8,398,858 trainable" in stdout
    assert "outputs bit-identical" in stdout
    assert f"wrote {out}/ (demo.txt, diff.html, graph.json, model.py, model.safetensors, surgery.json) in " in stdout
    model = fxs.load(out)
    assert model.fc.out_features == 10
    # a second demo run replaces its own earlier output
    assert cli("demo", "-o", out)[0] == 0


def test_demo_replaces_no_output_but_an_earlier_demos(tmp_path):
    """`demo -o DIR` replaced any fxsurgery output there (someone's surgery on their checkpoint), silently."""
    mine = tmp_path / "mine"
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - replace: fc\n    with: {module: torch.nn.Linear, out_features: 3}\n")
    assert cli("apply", RESNET, rules, "--input", "1x3x64x64", "-o", mine, "--quiet")[0] == 0
    before = {name: (mine / name).read_bytes() for name in os.listdir(mine)}
    code, stdout, stderr = cli("demo", "-o", mine)
    assert (code, stdout) == (2, "")
    assert stderr == (f"fxsurgery: error: {mine} exists and is not an earlier demo's output; fix: pass --force to replace it, "
                      "or -o another directory\n")
    assert {name: (mine / name).read_bytes() for name in os.listdir(mine)} == before
    assert cli("demo", "-o", mine, "--force")[0] == 0
    assert fxs.load(mine).fc.out_features == 10


def test_an_empty_directory_takes_an_output_without_force(tmp_path):
    """`mkdir out` then `apply -o out` was refused, and with --force "not an fxsurgery output": nothing there to lose."""
    (tmp_path / "empty").mkdir()
    code, stdout, _ = cli("apply", RESNET, "fold-bn", "--eval", "--input", "1x3x64x64", "-o", tmp_path / "empty", "--quiet")
    assert code == 0 and stdout.splitlines()[-1] == f"wrote {tmp_path / 'empty'}/ (graph.json, model.py, model.safetensors, surgery.json)"
    assert sorted(os.listdir(tmp_path)) == ["empty"] and fxs.load(tmp_path / "empty").fc.out_features == 1000


def test_apply_writes_and_reports(tmp_path):
    out = tmp_path / "o"
    code, stdout, _ = cli("apply", RESNET, os.path.join(RULES, "classifier-head.yaml"), "--set", "num_classes=37",
                          "--input", "1x3x64x64", "-o", out)
    assert code == 0
    assert "1  replace fc with Linear(out_features=37)  1        fc" in stdout
    assert f"wrote {out}/ (graph.json, model.py, model.safetensors, surgery.json)" in stdout
    assert fxs.load(out).fc.out_features == 37


def test_apply_json_and_dry_run(tmp_path):
    out = tmp_path / "o"
    code, stdout, _ = cli("apply", RESNET, os.path.join(RULES, "resnet-finetune.yaml"), "--input", "1x3x64x64",
                          "-o", out, "--dry-run", "--json")
    assert code == 0 and not out.exists()
    doc = json.loads(stdout)
    assert doc["dry_run"] is True and doc["output"] is None
    assert [m["matches"] for m in doc["matches"]] == [1, 30, 1, 1]
    assert doc["report"]["counts"]["frozen"] == 45


def test_inspect_table_and_json():
    code, stdout, _ = cli("inspect", RESNET, "--input", "1x3x64x64", "--depth", "1")
    assert code == 0
    assert stdout.splitlines()[0] == ("ResNet: 11,689,512 parameters (11,689,512 trainable), 71 graph nodes "
                                      "(placeholder 1, call_module 60, call_function 9, output 1); traced completely")
    assert any(line.split() == ["fc", "Linear", "[1,", "1000]", "513,000", "1", "graph"] for line in stdout.splitlines())
    assert not any(line.startswith("layer1.0") for line in stdout.splitlines())
    code, stdout, _ = cli("inspect", RESNET, "--input", "1x3x64x64", "--json")
    info = json.loads(stdout)
    relu = next(r for r in info["modules"] if r["path"] == "layer1.0.relu")
    assert relu["calls"] == 2 and relu["output"] == "[1, 64, 16, 16]"


def test_inspect_of_a_saved_result_shows_the_modules_that_hold_the_called_ones_as_containers(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - delete: layer4.1\n")
    assert cli("apply", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "out", "--quiet")[0] == 0
    code, stdout, _ = cli("inspect", tmp_path / "out", "--input", "1x3x64x64", "--json")
    runs = {r["path"]: (r["type"], r["runs"]) for r in json.loads(stdout)["modules"]}
    assert {p: runs[p] for p in ("layer1", "layer4", "layer4.0", "layer4.0.conv1", "fc")} == {
        "layer1": ("InlineSequential", "container"), "layer4": ("InlineSequential", "container"), "layer4.0": ("InlineBlock", "container"),
        "layer4.0.conv1": ("Conv2d", "graph"), "fc": ("Linear", "graph")}
    assert "layer4.1" not in runs and not [p for p, (_, how) in runs.items() if how == "unused"]


def test_inspect_says_the_layers_inside_a_leaf_run_in_it(tmp_path):
    """The layers of an nn.TransformerEncoder, which the graph calls whole, were listed as 'unused'."""
    (tmp_path / "tf.py").write_text(
        "from torch import nn\n\n\nclass Tiny(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False)\n"
        "        self.head = nn.Linear(8, 2)\n\n    def forward(self, x):\n        return self.head(self.enc(x))\n")
    code, stdout, _ = cli("inspect", f"{tmp_path / 'tf.py'}:Tiny", "--input", "2x5x8", "--json")
    runs = {r["path"]: r["runs"] for r in json.loads(stdout)["modules"]}
    assert code == 0 and (runs["enc"], runs["head"]) == ("graph", "graph")
    assert {p: how for p, how in runs.items() if p.startswith("enc.")} == {p: "in leaf" for p in runs if p.startswith("enc.")}
    assert len([p for p in runs if p.startswith("enc.")]) == 11  # layers, layers.0 and its 9 modules
    from fxsurgery.capture import capture
    from fxsurgery.views._inspect import overview

    class Block(nn.Module):  # traced through: a child it never calls stays unused
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu()
    rows = {r["path"]: r["runs"] for r in overview(capture(nn.Sequential(Block()), (torch.randn(1, 4),)))["modules"]}
    assert (rows["0.fc"], rows["0.spare"]) == ("graph", "unused")


def test_set_goes_to_each_rule_file_that_declares_the_param():
    # resnet-finetune declares num_classes and p, fold-bn per_site: "--set num_classes=5" was refused by fold-bn
    code, stdout, stderr = cli("check", "resnet-finetune", "fold-bn", "--set", "num_classes=5", "--set", "per_site=true", "--json")
    assert code == 0, stderr
    assert [(r["file"], r["params"]) for r in json.loads(stdout)] == [("resnet-finetune", {"num_classes": 5, "p": 0.2}),
                                                                      ("fold-bn", {"per_site": True})]
    code, stdout, stderr = cli("apply", RESNET, "resnet-finetune", "fold-bn", "--set", "num_classes=5", "--input", "1x3x64x64",
                               "--eval", "--dry-run", "--json", "--quiet")
    assert code == 0, stderr
    assert [(m["text"], m["matches"]) for m in json.loads(stdout)["matches"]] == [
        ("replace fc with Linear(out_features=5)", 1), ("freeze * except layer4.*, fc (bn: eval)", 30), ("detach after layer3", 1),
        ("insert Dropout(p=0.2) after avgpool", 1), ("rewrite fold_bn (conv + batchnorm -> conv)", 20),
        ("rewrite fold_linear_bn (linear + batchnorm1d -> linear)", 0)]
    code, _, stderr = cli("check", "resnet-finetune", "fold-bn", "--set", "num_clases=5")
    finetune, fold = (os.path.join(RULES, f"{name}.yaml") for name in ("resnet-finetune", "fold-bn"))
    assert (code, stderr) == (2, f"fxsurgery: error: --set num_clases: no rule file declares the param 'num_clases' (declared: "
                                 f"{finetune}: num_classes, p; {fold}: per_site); fix: use a declared name or add it under 'params:'\n")
    code, _, stderr = cli("check", "fold-bn", "--set", "num_classes=5")  # one file: its own message, as before
    assert (code, stderr) == (2, f"fxsurgery: error: {fold}: unknown param 'num_classes' (the file declares: per_site); fix: use a "
                                 "declared name or add it under 'params:'\n")


def test_a_dry_run_refuses_a_bad_rule_as_the_real_run_does():
    # the dry run builds new layers on meta: a fake-tensor pass mixed them with the inputs' device and blamed
    # the new layer itself with "FakeTensor ... DeviceMismatch"
    args = ("apply", RESNET, "classifier-head", "--input", "1x3x64x64", "--set", "head=conv1", "--quiet")
    dry, real = cli(*args, "--dry-run"), cli(*args)
    assert dry == real
    assert dry[0] == 2 and dry[2] == "fxsurgery: error: " + bounded(
        f"rule 1 'replace conv1 with Linear(out_features=10)' ({os.path.join(RULES, 'classifier-head.yaml')}:8) "
        "at node 'bn1' [call_module]: BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True) does not "
        "fit the incoming shape [1, 3, 64, 10]; fix: replace this layer too (fxs.new infers its input size), or insert a layer "
        "that maps the shape") + "\n"


def test_check_lists_rules():
    code, stdout, _ = cli("check", os.path.join(RULES, "resnet-finetune.yaml"), "--set", "num_classes=5")
    assert code == 0
    assert stdout.splitlines()[1:] == ["  1. replace fc with Linear(out_features=5)", "  2. freeze * except layer4.*, fc (bn: eval)",
                                       "  3. detach after layer3", "  4. insert Dropout(p=0.2) after avgpool"]
    assert stdout.splitlines()[0].endswith("resnet-finetune.yaml: ok, 4 rules")
    assert cli("check", "prune-half")[1].splitlines()[0] == "prune-half: ok, 1 rule"  # not "1 rules"


HEAD = "fxsurgery: 1\nrules:\n"

BAD = [
    ("yaml syntax", [HEAD + "  - delete: [fc\n"], [],
     "{r0}:3: YAML syntax error: expected ',' or ']', but got '<stream end>'; fix: correct the YAML at that line (indentation, quotes, ':' after keys)"),
    ("unknown key", [HEAD + "  - delete: fc\n    because: yes\n"], [],
     "{r0}:4: unknown key 'because' in 'delete' rule; fix: allowed: delete, optional"),
    ("disallowed class", [HEAD + "  - replace: fc\n    with: {module: subprocess.Popen}\n"], [],
     "{r0}:4: 'subprocess.Popen' is outside the allowlist (torch, torchvision); fix: use a public torch/torchvision name, or allow its package with --allow-module subprocess"),
    ("no match", [HEAD + "  - delete: fcc\n"], [],
     "rule 1 'delete fcc' ({r0}:3) matched nothing: no module path or node name matches 'fcc'; closest: fc; fix: correct the selector or add 'optional: true'"),
    ("shape cannot fit", [HEAD + "  - replace: fc\n    with: {module: torch.nn.Linear, in_features: 100, out_features: 3}\n"], [],
     "rule 1 'replace fc with Linear(in_features=100, out_features=3)' ({r0}:3) at node 'fc' [call_module]: Linear(in_features=100, out_features=3, bias=True) does not fit the incoming shape [1, 512]; fix: drop the shape argument and let it be inferred (fxs.new), or set it to match [1, 512]"),
    ("delete breaks consumer", [HEAD + "  - delete: layer2.0.conv1\n"], [],
     "rule 1 'delete layer2.0.conv1' ({r0}:3) at node 'layer2_0_bn1' [call_module]: {bn} does not fit the incoming shape [1, 64, 16, 16]; fix: replace this layer too (fxs.new infers its input size), or insert a layer that maps the shape"),
    ("model import", [HEAD + "  - delete: fc\n"], ["--model", "nonexistent_pkg.models:net"],
     "nonexistent_pkg.models:net: cannot import 'nonexistent_pkg.models': No module named 'nonexistent_pkg'; fix: install the package or correct the name"),
    ("model needs arguments", [HEAD + "  - delete: fc\n"], ["--model", "torch.nn:Linear"],
     "torch.nn:Linear: needs arguments to build a model; fix: name a factory that takes none (wrap it in a function in a .py file)"),
    ("not a module", [HEAD + "  - delete: fc\n"], ["--model", "torchvision.models:list_models"],
     "torchvision.models:list_models: returned a list, not a torch.nn.Module; fix: name a factory that returns a model"),
    ("weights do not load", [HEAD + "  - delete: fc\n"], ["--weights", "{junk}"],
     "{junk}: cannot read weights: Error while deserializing header: header too large; fix: pass a complete .safetensors file (or a weights-only .pt)"),
    ("input cannot be parsed", [HEAD + "  - delete: fc\n"], ["--input", "1x3xA"],
     "--input '1x3xA': cannot parse '1x3xA'; fix: write sizes joined by x, e.g. 1x3x224x224 (optionally :int64)"),
    ("output exists", [HEAD + "  - delete: fc\n"], ["--existing"],
     "{out}: already exists; fix: choose another output directory or pass --force"),
]


@pytest.mark.parametrize("texts, extra, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, texts, extra, expected):
    rules = [write(tmp_path, t, f"r{i}.yaml") for i, t in enumerate(texts)]
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    model, args = RESNET, ["--input", "1x3x64x64"]
    extra = list(extra)
    if "--model" in extra:
        model = extra[extra.index("--model") + 1]
        del extra[extra.index("--model"):extra.index("--model") + 2]
    if "--existing" in extra:
        out.mkdir()
        (out / "keep.txt").write_text("user data")
        extra.remove("--existing")
    if "--input" in extra:
        args = []
    extra = [e.format(junk=junk) for e in extra]
    code, stdout, stderr = cli("apply", model, *rules, *args, *extra, "-o", out)
    assert code == 2
    bn = repr(torch.nn.BatchNorm2d(128))  # its repr differs between torch releases
    assert stderr == "fxsurgery: error: " + bounded(expected.format(r0=rules[0], junk=junk, out=out, bn=bn)) + "\n"
    if "--existing" in [b for b in BAD if b[3] == expected][0][2]:
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


@pytest.mark.parametrize("text", [HEAD + "  - delete: [fc\n", HEAD + "  - delete: layer2.0.conv1\n"])
def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path, text):
    rules = write(tmp_path, text)
    code, stdout, stderr = cli_process("apply", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "out")
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("fxsurgery: error: ")
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists()


def test_pickled_model_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    code, _, stderr = cli("inspect", path)
    assert code == 2 and stderr == (f"fxsurgery: error: {path}: a pickled model runs code from the file when loaded; "
                                    "fix: pass --trust-pickle if you trust it, or name a factory (package.module:factory)\n")
    code, stdout, _ = cli("inspect", path, "--trust-pickle")
    assert code == 0 and stdout.startswith("Linear: 6 parameters")


def test_a_weights_file_or_any_other_file_as_model_is_told_so_not_sent_to_trust_pickle(tmp_path):
    """A safetensors file, a state dict or a text file given as MODEL got "a pickled model runs code...; fix: pass
    --trust-pickle": a fix that loads nothing, and unsafe advice besides."""
    from safetensors.torch import save_file
    layer = torch.nn.Linear(2, 2)
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(layer.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "notes.txt").write_text("hello")
    name = "(package.module:factory, path/file.py:Name or a saved directory)"
    for file, says in [("w.safetensors", f"holds safetensors weights, not a model; fix: name the model {name} and pass {tmp_path / 'w.safetensors'} as --weights"),
                       ("sd.pt", f"holds weights (a state dict), not a model; fix: name the model {name} and pass {tmp_path / 'sd.pt'} as --weights"),
                       ("notes.txt", f"is no model file (neither a pickle nor torch.save's zip); fix: name the model {name}")]:
        for trust in ([], ["--trust-pickle"]):
            code, stdout, stderr = cli("inspect", tmp_path / file, *trust)
            assert (code, stdout, stderr) == (2, "", f"fxsurgery: error: {bounded(f'{tmp_path / file}: {says}')}\n"), (file, trust)


def test_a_saved_directory_is_a_model_reference(tmp_path):
    out = tmp_path / "o"
    assert cli("apply", RESNET, os.path.join(RULES, "classifier-head.yaml"), "--input", "1x3x64x64", "-o", out)[0] == 0
    code, stdout, _ = cli("inspect", out, "--input", "1x3x64x64", "--json")
    assert code == 0
    assert next(r for r in json.loads(stdout)["modules"] if r["path"] == "fc")["output"] == "[1, 10]"


def test_diff_command_writes_html_or_svg(tmp_path):
    rules = os.path.join(RULES, "resnet-finetune.yaml")
    code, stdout, _ = cli("diff", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "d.svg")
    assert code == 0 and stdout == f"wrote {tmp_path / 'd.svg'}\n"
    svg = (tmp_path / "d.svg").read_text()
    assert svg.startswith("<svg") or svg.startswith("<?xml")
    assert "avgpool_dropout" in svg
    code, _, stderr = cli("diff", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "d.png")
    assert code == 2 and stderr == (f"fxsurgery: error: {tmp_path / 'd.png'}: cannot tell the format from the suffix '.png'; "
                                    "fix: name the file .html or .svg\n")
    assert sorted(os.listdir(tmp_path)) == ["d.svg"]
    (tmp_path / "notes.svg").write_text("important")  # a file already there is not lost
    code, _, stderr = cli("diff", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "notes.svg")
    assert (code, stderr) == (2, f"fxsurgery: error: {tmp_path / 'notes.svg'}: already exists; fix: pass --force to replace "
                                 "it, or choose another name\n")
    assert (tmp_path / "notes.svg").read_text() == "important"
    assert cli("diff", RESNET, rules, "--input", "1x3x64x64", "-o", tmp_path / "notes.svg", "--force")[0] == 0
    assert (tmp_path / "notes.svg").read_text() == svg


@pytest.mark.parametrize("argv", [
    ["apply", "torchvision.models:resnet18", "classifier-head", "-o", ""],
    ["diff", "torchvision.models:resnet18", "classifier-head", "-o", " "],
    ["map-weights", "w.safetensors", "out", "-o", ""],
    ["demo", "-o", ""],
], ids=["apply", "diff", "map-weights", "demo"])
def test_an_empty_output_path_is_refused_before_any_work(tmp_path, argv):
    """-o "$OUT" with OUT unset: apply used to run, print 'nothing written' and exit 0."""
    argv = [os.path.join(RULES, a + ".yaml") if a == "classifier-head" else a for a in argv]
    code, stdout, stderr = cli_process(*argv, cwd=tmp_path)  # a usage error: argparse exits the process
    assert (code, stdout, os.listdir(tmp_path)) == (2, "", [])
    assert stderr == "fxsurgery: error: argument -o/--output: is empty; fix: name the output, e.g. -o out/\n"


def test_a_format_is_checked_by_a_dry_run_and_needs_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    head = os.path.join(RULES, "classifier-head.yaml")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", head, "--input", "2x3x32x32", "--format", "hf", "--dry-run",
                               "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr == ("fxsurgery: error: format hf: the result is a regenerated graph module, which has no save_pretrained; fix: "
                      "apply to a transformers model (kept as its class by default), or leave format hf out\n")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", head, "--input", "2x3x32x32", "--format", "onnx", "--quiet")
    assert (code, stdout, os.listdir(tmp_path)) == (2, "", [])
    assert stderr == "fxsurgery: error: --format onnx: nothing is written without -o; fix: pass -o DIR, or --dry-run to check the formats\n"
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", head, "--input", "2x3x32x32", "--format", "onnx", "--dry-run",
                               "--quiet")
    assert (code, stderr, stdout.endswith("dry run: nothing written\n"), os.listdir(tmp_path)) == (0, "", True, [])
    (tmp_path / "f.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: layer1\n")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", tmp_path / "f.yaml", "--format", "pt2", "--dry-run", "--quiet")
    assert (code, stdout, stderr) == (2, "", "fxsurgery: error: cannot write pt2 without example inputs; fix: pass example_inputs (--input)\n")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", tmp_path / "f.yaml", "--input", "2x3x32x32", "--stream",
                               "--format", "onnx", "--dry-run", "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr == ("fxsurgery: error: formats onnx: a streamed result holds no weights in memory to export; fix: leave formats out, "
                      "or apply without stream\n")


@pytest.mark.parametrize("option", ["--weights", "--leaf", "--allow-module"])
def test_an_empty_option_value_is_refused(tmp_path, option):
    """--weights "$CKPT" with CKPT unset applied to the random-init model and exited 0."""
    code, stdout, stderr = cli_process("apply", "torchvision.models:resnet18", os.path.join(RULES, "freeze-backbone.yaml"),
                                       "--input", "2x3x32x32", option, "", "-o", tmp_path / "out")
    assert (code, stdout, os.listdir(tmp_path)) == (2, "", [])
    assert stderr == f"fxsurgery: error: argument {option}: is empty; fix: give it a value, or leave the option out\n"


def test_an_empty_example_and_a_depth_below_one_are_refused(tmp_path):
    """--input 0x3x32x32 saved a surgery checked on an empty batch; --depth -3 printed an empty table; both exited 0."""
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULES, "freeze-backbone.yaml"),
                               "--input", "0x3x32x32", "-o", tmp_path / "out")
    assert (code, stdout, os.listdir(tmp_path)) == (2, "", [])
    assert stderr == ("fxsurgery: error: --input '0x3x32x32': a size of 0 gives an empty example, which checks nothing; "
                      "fix: use sizes of 1 or more, e.g. 1x3x224x224\n")
    code, stdout, stderr = cli_process("inspect", "torchvision.models:resnet18", "--depth", "-3")
    assert (code, stdout) == (2, "")
    assert stderr == "fxsurgery: error: argument --depth: '-3' is not a depth; fix: give 1 or more (1: the model's children)\n"


def test_quiet_prints_the_warnings_and_what_was_written_only(tmp_path):
    """--quiet hid the progress bars and printed the plan, the transfer tables and the gradient flow (24 lines)."""
    rules = tmp_path / "f.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - freeze: layer1\n")
    code, stdout, stderr = cli("apply", RESNET, rules, "--input", "2x3x32x32", "--quiet", "-o", tmp_path / "out")
    assert (code, stderr) == (0, "")
    assert stdout == (f"warnings:\n  rule 1 'freeze layer1' ({rules}:3) freezes 4 BatchNorm layers (layer1.0.bn1, layer1.0.bn2 "
                      "and 2 more), whose running statistics still move under model.train(); fix: bn='eval' (bn: eval in a rule "
                      f"file) holds them, unless they should adapt\n\nwrote {tmp_path / 'out'}/ (graph.json, model.py, "
                      "model.safetensors, surgery.json)\n")
    code, stdout, _ = cli("apply", RESNET, "classifier-head", "--input", "2x3x32x32", "--quiet", "-o", tmp_path / "o2")
    assert (code, stdout) == (0, f"wrote {tmp_path / 'o2'}/ (graph.json, model.py, model.safetensors, surgery.json)\n")
    code, stdout, _ = cli("apply", RESNET, "classifier-head", "--input", "2x3x32x32", "-o", tmp_path / "o3")
    assert stdout.startswith("plan:\n") and "\ntransfer:\n" in stdout  # without it, the tables


def test_the_report_escapes_control_characters_of_a_rule_files_name(tmp_path):
    """Errors escaped them; the report lines on stdout passed a file name's escape sequence to the terminal."""
    rules = tmp_path / "ok\x1b[31m.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - replace: fc\n    with: {module: torch.nn.Linear, out_features: 3}\n")
    code, stdout, _ = cli("apply", RESNET, rules, "--input", "1x3x64x64", "--dry-run", "--explain")
    assert code == 0 and "\x1b" not in stdout
    assert f"  new         fc.weight [3, 512] float32: made by rule 1 'replace fc with Linear(out_features=3)' ({tmp_path}/ok\\x1b[31m.yaml:3)" in stdout.splitlines()


def test_weights_that_are_a_pickled_model_are_told_so_in_one_line(tmp_path):
    """torch's weights-only refusal is a page of advice with terminal escapes; its first line promised two options
    and listed none."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    code, stdout, stderr = cli("apply", RESNET, "fold-bn", "--input", "1x3x64x64", "--weights", tmp_path / "whole.pt", "--dry-run")
    assert (code, stdout) == (2, "")
    assert stderr == "fxsurgery: error: " + bounded(
        f"{tmp_path / 'whole.pt'}: holds pickled objects other than tensors (torch.nn.modules.linear.Linear), "
        "a whole model perhaps, which loading weights never runs; fix: save the model's weights "
        "(safetensors.torch.save_model(model, path), or torch.save(model.state_dict(), path)) and pass that") + "\n"


def test_shipped_rules_are_found_from_a_source_tree_without_an_install(tmp_path):
    """Run with PYTHONPATH from a checkout (no install maps `fxsurgery.rules` to rules/), `rules`, `demo` and shipped
    rule names ended in "internal error: ModuleNotFoundError"; they read rules/ of the tree."""
    import subprocess
    import sys

    from conftest import ROOT
    script = ("import sys, runpy\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
              "sys.argv = ['fxsurgery', *sys.argv[1:]]\nrunpy.run_module('fxsurgery', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, "check", "fold-bn"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines()[0] == "fold-bn: ok, 2 rules"
    listed = subprocess.run([sys.executable, "-c", script, "rules"], capture_output=True, text=True, cwd=tmp_path, env=env)
    names = sorted(f.removesuffix(".yaml") for f in os.listdir(os.path.join(ROOT, "rules")) if f.endswith(".yaml"))
    assert listed.returncode == 0 and [line for line in listed.stdout.splitlines() if line and not line.startswith(" ")] == [
        *names, f"{len(names)} rule files; use one by name: fxsurgery apply MODEL classifier-head --set k=v"]
