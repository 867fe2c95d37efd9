"""First-day papercuts, each with the behaviour a user expects: lists where a list is natural,
a report that answers for every tensor, a CLI that says what it wrote and how to give token ids."""

import json
import os

import pytest
import torch
import torchvision
from conftest import cli
from test_bad_inputs import run_cli

import fxsurgery as fxs
from fxsurgery import Freeze, MatchError, Output, Replace
from fxsurgery.errors import bounded


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_freeze_takes_a_list_as_exclude_does(resnet, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Freeze(["conv1", "layer1.*"])], example_inputs=(x,))
    frozen = sorted(n for n, p in result.module.named_parameters() if not p.requires_grad)
    want = sorted(n for n, _ in resnet.named_parameters() if n.startswith(("conv1.", "layer1.")))
    assert frozen == want and len(want) == 13
    assert str(result.plan.matches[0].rule) == "freeze conv1, layer1.*"
    path = tmp_path / "freeze.yaml"
    path.write_text('fxsurgery: 1\nrules:\n  - freeze: [conv1, "layer1.*"]\n')
    again = fxs.apply(resnet, [str(path)], example_inputs=(x,))
    assert sorted(n for n, p in again.module.named_parameters() if not p.requires_grad) == want


def test_a_list_member_that_selects_nothing_is_an_error_not_a_silent_skip(resnet):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet, [Freeze(["conv1", "layer9"])], example_inputs=(x,))
    assert str(err.value).endswith("matched nothing: no module path or node name matches 'layer9'; closest: layer4, layer3, layer2; "
                                   "fix: correct the selector or add 'optional: true'")
    # its must-not-match twin: optional, the rest is frozen and nothing else
    result = fxs.apply(resnet, [Freeze(["conv1", "layer9"], optional=True)], example_inputs=(x,))
    assert sorted(n for n, p in result.module.named_parameters() if not p.requires_grad) == ["conv1.weight"]


def test_report_entry_answers_for_dropped_tensors_and_names_unknown_ones(resnet):
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Output("layer2"), Replace("layer2.1.conv2", torch.nn.Conv2d(128, 128, 3, padding=1))],
                       example_inputs=(x,))
    assert result.report.entry("layer4.0.conv1.weight").status == "dropped"
    assert result.report.entry("layer2.1.conv2.weight").status == "new"
    with pytest.raises(KeyError) as err:
        result.report.entry("layer2.1.conv9.weight")
    assert err.value.args[0] == ("no tensor 'layer2.1.conv9.weight' in the new module or the original; "
                                 "closest: layer2.1.conv2.weight, layer2.1.conv1.weight, layer4.1.conv2.weight")


def test_cli_lists_every_file_it_wrote(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = cli("apply", "torchvision.models:resnet18", "rules/classifier-head.yaml", "--input", "1x3x64x64",
                          "-o", out, "--format", "torchscript")
    assert code == 0
    listed = json.loads((out / "surgery.json").read_text())["files"]
    assert listed == ["graph.json", "model.py", "model.safetensors", "model.torchscript.pt", "surgery.json"]
    assert stdout.rstrip().splitlines()[-1] == f"wrote {out}/ (graph.json, model.py, model.safetensors, model.torchscript.pt, surgery.json)"


def test_cli_help_says_how_to_give_token_ids(capsys):
    from fxsurgery.cli import main
    with pytest.raises(SystemExit) as done:
        main(["apply", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "integer inputs (token ids) with a dtype, e.g. 1x16:int64" in text


def test_a_surgery_in_which_no_rule_matched_writes_nothing_and_says_why(tmp_path):
    out = tmp_path / "out"
    code, _, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "fold-bn", "--input", "1x3x64x64", "-o", str(out)])
    assert code == 2 and not out.exists() and stderr == f"fxsurgery: error: {bounded(raised.full)}\n"
    assert raised.full.startswith("nothing to change: rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' (")
    assert raised.full.endswith(
        "every candidate was left alone: conv1 (Conv2d) + bn1 (BatchNorm2d): BatchNorm2d is in training mode, where it normalises with "
        "batch statistics; fix: pass --eval (inference rewrites such as fold-bn need the model in eval mode)")
    assert stderr.count("\n") == 1
    # its twin: in eval mode the same rules fold every BatchNorm
    code, stdout, _ = cli("apply", "torchvision.models:resnet18", "fold-bn", "--input", "1x3x64x64", "--eval", "-o", out)
    assert code == 0 and "BatchNorm" not in (out / "model.py").read_text()


def test_diff_of_a_transformers_model_captured_through_its_call_form(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    result = fxs.apply(model, [Freeze("bert.embeddings.*")], example_inputs=(ids,), keep_class=False)
    page = fxs.diff(result, tmp_path / "diff.html").read_text()
    assert "<h1>fxsurgery diff: BertForSequenceClassification, 1 rules</h1>" in page
    assert page.count('data-status="frozen" data-op="call_module"') == 8   # the four embedding modules, in each pane
    kept = fxs.apply(model, [Freeze("bert.embeddings.*")], example_inputs=(ids,))
    with pytest.raises(fxs.SaveError) as err:
        fxs.diff(kept, tmp_path / "kept.html")
    assert str(err.value) == ("the result keeps the class BertForSequenceClassification and runs its own code, so there is no graph "
                              "to draw; fix: apply with keep_class=False to see the graphs before and after")
    assert not (tmp_path / "kept.html").exists()


BERT = """
import transformers
def tiny_bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()
"""


def test_inspect_without_inputs_on_a_model_that_stays_python_says_to_pass_them(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "models.py").write_text(BERT)
    hint = ("  the model stays Python without example inputs: pass --input to trace it (--input 1x3x224x224; token ids "
            "with a dtype: --input 1x16:int64)")
    code, stdout, _ = cli("inspect", f"{tmp_path / 'models.py'}:tiny_bert")
    assert code == 0 and stdout.splitlines()[-1] == hint  # it listed every module as unused and 0 graph nodes, no more
    code, stdout, _ = cli("inspect", f"{tmp_path / 'models.py'}:tiny_bert", "--input", "1x16:int64")
    assert code == 0 and hint not in stdout and "classifier" in stdout


def test_float_token_ids_are_told_to_take_a_dtype(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "models.py").write_text(BERT)
    code, _, stderr = cli("apply", f"{tmp_path / 'models.py'}:tiny_bert", "classifier-head", "--input", "1x16", "-o", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists() and stderr.count("\n") == 1
    assert stderr.startswith("fxsurgery: error: the original model fails on the example inputs: RuntimeError: Expected tensor for argument #1 'indices'")
    assert stderr.endswith("; fix: token ids are integers: give them a dtype, e.g. --input 1x16:int64\n")
    # twin: an image model given the wrong rank keeps the general fix
    code, _, stderr = cli("apply", "torchvision.models:resnet18", "classifier-head", "--input", "1x3x64", "-o", tmp_path / "out")
    assert code == 2 and stderr.endswith("; fix: pass inputs the original model accepts\n")


def test_the_cli_diff_draws_a_transformers_model(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "models.py").write_text(BERT)
    (tmp_path / "freeze.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: bert.embeddings\n")
    page = tmp_path / "diff.html"
    code, stdout, stderr = cli("diff", f"{tmp_path / 'models.py'}:tiny_bert", tmp_path / "freeze.yaml", "--input", "1x16:int64", "-o", page)
    # apply keeps a transformers model as its class, which has no graph; the page is drawn from the graph instead
    assert (code, stdout, stderr) == (0, f"wrote {page}\n", "")
    assert page.read_text().count('data-status="frozen" data-op="call_module"') == 8   # the four embedding modules, each pane


def test_a_model_built_without_weights_is_refused_for_its_own_reason(tmp_path):
    # resnet18 in train mode on one 32x32 image reaches BatchNorm with one value per channel: built
    # on meta (to be filled by weights=), the error used to blame the meta weights instead
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, tmp_path / "w.safetensors")
    with fxs.empty_weights():
        model = torchvision.models.resnet18()
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(model, [Freeze("layer1")], example_inputs=(torch.randn(1, 3, 32, 32),), weights=tmp_path / "w.safetensors")
    assert str(err.value) == ("the original model fails on the example inputs: ValueError: Expected more than 1 value per channel "
                              "when training, got input size torch.Size([1, 512, 1, 1]); fix: example inputs with a batch of 2 or "
                              "more (--input 2x...), or the model in eval mode (--eval)")
    result = fxs.apply(model, [Freeze("layer1")], example_inputs=(torch.randn(2, 3, 32, 32),), weights=tmp_path / "w.safetensors")
    assert result.report.frozen and all(not p.is_meta for p in result.module.parameters())


def test_a_batchnorm_a_rule_inserts_where_a_batch_of_one_gives_one_value_says_batch_or_eval():
    """insert-norm's BatchNorm1d before a head, on one image in training mode: the fix is the batch or the mode,
    not the replacement's shape."""
    from conftest import RULES
    rules = fxs.load_rules(os.path.join(RULES, "insert-norm.yaml"))
    model = torchvision.models.resnet18()
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(model, rules, example_inputs=(torch.randn(1, 3, 64, 64),))
    assert str(err.value) == (f"rule 1 'insert BatchNorm1d() before fc' ({rules.rules[0].origin}) at node 'fc_batch_norm1d' [call_module]: "
                              "BatchNorm1d in training mode needs 2+ values per channel, gets [1, 512]; fix: example inputs with "
                              "a batch of 2 or more (--input 2x...), or eval mode (--eval)")
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(model.eval(), rules, example_inputs=(x,))
    norm = result.module.get_submodule("fc_batch_norm1d")
    features = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
        model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    with torch.no_grad():
        assert torch.equal(result.module(x), model.fc(norm(features)))


def test_an_integer_mask_example_is_ones_so_the_example_masks_nothing(tmp_path):
    """--input attention_mask=2x16:int64 was zeros: every token masked, and the ONNX check then failed
    ("differs from the module by 5.45e-04") with a fix that pointed away from the cause."""
    pytest.importorskip("onnxruntime")
    import transformers

    from fxsurgery.cli._modelref import parse_inputs, unmasked
    (tmp_path / "models.py").write_text(BERT)
    (tmp_path / "head.yaml").write_text("fxsurgery: 1\nrules:\n  - replace: classifier\n    with: {module: torch.nn.Linear, out_features: 3}\n")
    code, stdout, stderr = cli("apply", f"{tmp_path / 'models.py'}:tiny_bert", tmp_path / "head.yaml", "--input", "2x16:int64",
                               "--input", "attention_mask=2x16:int64", "--no-keep-class", "--format", "onnx", "-o", tmp_path / "out",
                               "--quiet")
    assert (code, stderr) == (0, ""), stderr
    model = transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                                               num_attention_heads=2, intermediate_size=37))
    inputs, keywords = unmasked(model, *parse_inputs(["2x4:int64", "2x4:int64", "2x4:int64", "token_type_ids=2x4:int64"]))
    assert [int(t.sum()) for t in inputs] == [0, 8, 0] and int(keywords["token_type_ids"].sum()) == 0   # ids, attention_mask, type ids
