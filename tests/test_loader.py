"""Rule files: what parses, and the exact error for what does not."""


import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace, RuleError
from fxsurgery.errors import bounded
from fxsurgery.spec import New, parse_overrides

DESIGN_EXAMPLE = """\
fxsurgery: 1
description: Fine-tune a torchvision ResNet on a new label set.
params: {num_classes: 10}            # overridable: --set num_classes=37
rules:
  - replace: fc
    with: {module: torch.nn.Linear, out_features: ${num_classes}}
  - freeze: "*"
    except: ["layer4.*", "fc"]
  - detach: {after: layer3}
  - insert: {after: avgpool, module: torch.nn.Dropout, p: 0.2}
  - delete: layer4.1
  - replace: {type: torch.nn.ReLU}
    with: {module: torch.nn.GELU}
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_design_example_parses_to_rules(tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)
    rules = fxs.load_rules(path, params={"num_classes": 37})
    assert [type(r) for r in rules] == [Replace, Freeze, Detach, Insert, Delete, Replace]
    assert rules.params == {"num_classes": 37}
    head = rules.rules[0]
    assert head.replacement == New(nn.Linear, {"out_features": 37})
    assert str(head.target) == "fc" and str(head.origin) == f"{path}:5"
    assert [str(e) for e in rules.rules[1].exclude] == ["layer4.*", "fc"]
    assert rules.rules[3].module == New(nn.Dropout, {"p": 0.2}) and str(rules.rules[3].after) == "avgpool"
    assert rules.rules[5].target.value is nn.ReLU and rules.rules[5].replacement == New(nn.GELU, {})
    assert [r.origin.line for r in rules] == [5, 7, 9, 10, 11, 12]


def test_the_design_example_runs_on_resnet50(tmp_path):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    result = fxs.apply(model, [write(tmp_path, DESIGN_EXAMPLE)], example_inputs=(torch.randn(1, 3, 64, 64),))
    # freeze: modules with parameters are 2 (stem) + 16 blocks x 6 + 4 downsamples x 2 + fc = 107,
    # less layer4 (3 x 6 + 2) and fc = 86; ReLU: the stem's + 3 calls per block, less layer4.1's 3
    assert [m.count for m in result.plan.matches] == [1, 86, 1, 1, 1, 1 + 3 * 16 - 3]
    assert result.plan.matches[5].skipped == [
        f"layer4.1.relu{k} (gone after {result.plan.matches[4].label})" for k in ("", "@1", "@2")]
    assert result.module(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_set_values_are_read_as_yaml_scalars():
    assert parse_overrides(["num_classes=37", "p=0.5", "head=classifier.1", "flag=true"]) == {
        "num_classes": 37, "p": 0.5, "head": "classifier.1", "flag": True}


HEAD = "fxsurgery: 1\nrules:\n"

BAD = [
    ("syntax", HEAD + "  - delete: [fc\n",
     "{path}:3: YAML syntax error: expected ',' or ']', but got '<stream end>'; fix: correct the YAML at that line (indentation, quotes, ':' after keys)"),
    ("empty", "",
     "{path}: the rule file is empty; fix: start it with 'fxsurgery: 1' and a 'rules:' list"),
    ("not a mapping", "- delete: fc\n",
     "{path}:1: a rule file is a mapping, got a list; fix: start it with 'fxsurgery: 1' and a 'rules:' list"),
    ("version", "fxsurgery: 2\nrules:\n  - delete: fc\n",
     "{path}:1: unsupported version fxsurgery: 2; fix: write 'fxsurgery: 1'"),
    ("no version", "rules:\n  - delete: fc\n",
     "{path}:1: missing 'fxsurgery: 1'; fix: add it as the first line"),
    ("unknown top key", "fxsurgery: 1\nrule:\n  - delete: fc\n",
     "{path}:2: unknown key 'rule' in the file; fix: did you mean 'rules'?"),
    ("no rules", "fxsurgery: 1\nrules: []\n",
     "{path}:2: 'rules' must be a non-empty list; fix: add rules such as '- delete: layer4'"),
    ("unknown rule key", HEAD + "  - delete: fc\n    optinal: true\n",
     "{path}:4: unknown key 'optinal' in 'delete' rule; fix: did you mean 'optional'?"),
    ("two actions", HEAD + "  - delete: fc\n    freeze: fc\n",
     "{path}:3: a rule needs exactly one action (delete, replace, insert, detach, freeze, layers, rewrite, use, output, prune), found delete, freeze; fix: split it into one rule per action"),
    ("no action", HEAD + "  - remove: fc\n",
     "{path}:3: a rule needs exactly one action (delete, replace, insert, detach, freeze, layers, rewrite, use, output, prune), found remove; fix: start it with one of delete, replace, insert, detach, freeze, layers, rewrite, use, output, prune"),
    ("optional type", HEAD + "  - delete: fc\n    optional: maybe\n",
     "{path}:4: 'optional' must be true or false, got 'maybe'; fix: write 'optional: true'"),
    ("duplicate key", HEAD + "  - delete: fc\n    delete: bn1\n",
     "{path}:4: YAML syntax error: duplicate key 'delete'; fix: correct the YAML at that line (indentation, quotes, ':' after keys)"),
    ("unknown param", HEAD + "  - delete: ${head}\n",
     "{path}:3: unknown param ${{head}} (declared: none); fix: declare it under 'params:' or correct the name"),
    ("outside allowlist", HEAD + "  - replace: fc\n    with: {module: os.system}\n",
     "{path}:4: 'os.system' is outside the allowlist (torch, torchvision); fix: use a public torch/torchvision name, or allow its package with --allow-module os"),
    ("escape through a module attribute", HEAD + "  - replace: fc\n    with: {function: torch.serialization.os.system}\n",
     "{path}:4: 'torch.serialization.os.system' is not a class or function of an allowed package; fix: name a class or function defined in torch/torchvision or an allowed module"),
    ("private name", HEAD + "  - replace: fc\n    with: {function: torch._C._nn.gelu}\n",
     "{path}:4: 'torch._C._nn.gelu' is a private name, which rule files cannot reach; fix: use a public name, e.g. torch.nn.functional.gelu"),
    ("nonexistent class", HEAD + "  - replace: fc\n    with: {module: torch.nn.Linearr}\n",
     "{path}:4: 'torch.nn.Linearr' does not exist; fix: did you mean torch.nn.Linear?"),
    ("function as module", HEAD + "  - replace: fc\n    with: {module: torch.relu}\n",
     "{path}:4: 'torch.relu' is not a torch.nn.Module class; fix: name a Module class such as torch.nn.GELU"),
    ("rejected argument", HEAD + "  - replace: fc\n    with: {module: torch.nn.Linear, outfeatures: 3}\n",
     "{path}:4: torch.nn.Linear does not take 'outfeatures'; fix: use its arguments (in_features, out_features, bias)"),
    ("python tag", HEAD + "  - delete: !!python/object/apply:os.system ['echo hi']\n",
     "{path}:3: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed: a rule file is data, not code; fix: name classes by dotted path, e.g. 'module: torch.nn.ReLU'"),
    ("insert without anchor", HEAD + "  - insert: {module: torch.nn.ReLU}\n",
     "{path}:3: insert needs exactly one of 'after' or 'before'; fix: e.g. 'insert: {{after: layer3}}'"),
    ("replace without with", HEAD + "  - replace: fc\n",
     "{path}:3: replace needs 'with:'; fix: add e.g. 'with: {{module: torch.nn.GELU}}'"),
    ("bad weights", HEAD + "  - replace: fc\n    with: {module: torch.nn.Identity}\n    weights: copy\n",
     "{path}:5: unknown weights policy 'copy'; fix: use one of new, keep, slice, pad, adapt_input_channels, or {{select: [row indices]}}"),
    ("negative row selected", HEAD + "  - replace: fc\n    with: {module: torch.nn.Identity}\n    weights: {select: [-1, 0]}\n",
     "{path}:5: weights select holds -1, not a row index; fix: list the rows to keep as indices from 0, e.g. {{select: [0, 2, 5]}}"),
    ("bad selector", HEAD + "  - delete: {kind: torch.nn.ReLU}\n",
     "{path}:3: bad selector {{'kind': 'torch.nn.ReLU'}}; fix: write a glob string, {{type: torch.nn.ReLU}}, {{function: torch.relu}} or {{method: view}}"),
    ("bad regex", HEAD + "  - delete: 're:layer(['\n",
     "{path}:3: bad regular expression 're:layer([': unterminated character set at position 6; fix: correct the pattern after 're:'"),
    # a few bytes of rule file held the matcher for hours: backtracking is refused when the file is read
    ("regex of repeated alternatives", HEAD + "  - freeze: 're:(.|.|.)*Q'\n",
     "{path}:3: regular expression 're:(.|.|.)*Q' repeats a group of alternatives, which can take Python's matcher hours on "
     "one name; fix: a simpler pattern, or a glob ('layer*.conv?')"),
    ("regex of nested repeats", HEAD + "  - freeze: 're:(layer[0-9]+)+'\n",
     "{path}:3: regular expression 're:(layer[0-9]+)+' repeats a group that repeats, which can take Python's matcher hours on "
     "one name; fix: a simpler pattern, or a glob ('layer*.conv?')"),
    ("regex of optional parts repeated", HEAD + "  - freeze: 're:(?:[a-z]?[a-z]?)+x'\n",
     "{path}:3: regular expression 're:(?:[a-z]?[a-z]?)+x' repeats a group that repeats, which can take Python's matcher hours "
     "on one name; fix: a simpler pattern, or a glob ('layer*.conv?')"),
    ("regex of many repeats", HEAD + "  - freeze: 're:.*.*.*.*Q'\n",
     "{path}:3: regular expression 're:.*.*.*.*Q' holds 4 repeats (at most 3), which can take Python's matcher hours on "
     "one name; fix: a simpler pattern, or a glob ('layer*.conv?')"),
    ("regex of alternatives one after another", HEAD + "  - freeze: 're:" + "(?:.|.)" * 9 + "Z'\n",
     "{path}:3: regular expression 're:" + "(?:.|.)" * 9 + "Z' holds groups of alternatives one after another, more than "
     "256 ways to match, which can take Python's matcher hours on one name; fix: a simpler pattern, or a glob ('layer*.conv?')"),
    # the fix said 'e.g. kernel_size: 3' whatever was missing
    ("missing constructor argument", HEAD + "  - replace: fc\n    with: {module: torch.nn.Embedding, num_embeddings: 3}\n",
     "{path}:4: torch.nn.Embedding needs 'embedding_dim'; fix: give it in the rule, e.g. {{module: torch.nn.Embedding, "
     "embedding_dim: ...}}"),
    ("bad glob", HEAD + "  - delete: ' fc'\n",
     "{path}:3: bad glob ' fc': empty or padded with spaces; fix: write a module path such as 'layer1.*' or '*'"),
    ("except not a list", HEAD + "  - freeze: '*'\n    except: 3\n",
     "{path}:4: 'except' must be a list of selectors; fix: e.g. except: ['layer4.*', fc]"),
    ("detach extra key", HEAD + "  - detach: {after: layer3, module: torch.nn.ReLU}\n",
     "{path}:3: unknown key 'module' in 'detach'; fix: allowed: after, before"),
]


@pytest.mark.parametrize("text, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_rule_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == bounded(expected.format(path=path))  # a long one is shortened in its middle


def test_unknown_set_param(tmp_path):
    path = write(tmp_path, "fxsurgery: 1\nparams: {num_classes: 10}\nrules:\n  - delete: fc\n")
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path, params={"num_clases": 3})
    assert str(err.value) == f"{path}: unknown param 'num_clases' (the file declares: num_classes); fix: use a declared name or add it under 'params:'"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == f"{path}: cannot read rule file: No such file or directory; fix: check the path"


def test_allow_module_extends_the_allowlist(tmp_path):
    text = HEAD + "  - replace: fc\n    with: {function: math.sqrt}\n"
    with pytest.raises(fxs.RuleError, match="outside the allowlist"):
        fxs.load_rules(write(tmp_path, text))
    rules = fxs.load_rules(write(tmp_path, text), allow=["math"])
    import math
    assert rules.rules[0].replacement is math.sqrt


def test_a_missing_constructor_argument_in_python_is_named_in_python():
    with pytest.raises(RuleError) as err:
        fxs.new(nn.Conv2d, in_channels=1)
    assert str(err.value).endswith("torch.nn.Conv2d needs 'out_channels' and 'kernel_size'; fix: give them in the rule, "
                                   "e.g. fxs.new(Conv2d, out_channels=..., kernel_size=...)")
