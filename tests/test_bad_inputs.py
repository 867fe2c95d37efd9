"""Bad input: every case ends in one typed error that says where and what to do.

The corpus lives in tests/bad_inputs/ (rule files, small model files); binary
inputs (weights, pickles) are written at test time. Each case runs the command
line in-process and asserts:

- the exact FxsError subclass raised inside the command;
- the message names the file and line (or the rule and its file:line origin,
  or the model reference, weights file or argument at fault), is one line and
  has exactly one 'fix:' part; where its text is stable, the whole message;
- exit status 2, stdout empty, stderr exactly 'fxsurgery: error: MESSAGE';
- nothing is written at the output path (and no temporary directory is left).

A sample also runs as a real process (`python -m fxsurgery.cli`). Freezing a
module without parameters is a warning, not an error: exit status 0 and the
warning printed with the plan.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import cli_process
from safetensors.torch import save_file
from torch import nn

import fxsurgery as fxs
import fxsurgery.cli as cli_module
from fxsurgery import (
    Delete,
    Detach,
    Freeze,
    Insert,
    MatchError,
    ModelError,
    Replace,
    RewriteError,
    RuleError,
    SaveError,
    TraceError,
    TransferError,
    ValidateError,
)
from fxsurgery.capture import trace
from fxsurgery.errors import bounded

BAD = Path(__file__).resolve().parent / "bad_inputs"
RULES = BAD / "rules"
MODELS = BAD / "models.py"
RESNET = "torchvision.models:resnet18"
IMG = "--input=1x3x64x64"    # resnet18 in training mode needs more than one value per channel at layer4
VEC = "--input=2x4"          # the small models of bad_inputs/models.py

FIX = re.compile(r"; fix: \S")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple                   # templates, see fill()
    error: type | None            # the FxsError subclass; None: a warning and exit status 0
    where: str                    # the place the message must name
    message: str | None = None    # the whole message, where its text is stable
    contains: tuple = ()          # further parts the message must hold
    fix: str = ""                 # a part the fix must hold
    setup: str = ""               # what sits at the output path before: "dir", "file", "under-file"
    process: bool = False         # also run as a real process


def fill(text: str, env: dict) -> str:
    for key, value in env.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _apply(files, *, model=RESNET, inputs=IMG, extra=(), out=True) -> tuple:
    files = (files,) if isinstance(files, str) else files
    argv = ["apply", model, *(f"{{R}}/{f}.yaml" for f in files)]
    argv += [inputs] if inputs else []
    argv += list(extra)
    argv += ["-o", "{OUT}"] if out else []
    return tuple(argv)


def at(file: str, line: int | None) -> str:
    """The location a rule-file error starts with."""
    return f"{{R}}/{file}.yaml:{line}: " if line else f"{{R}}/{file}.yaml: "


def load_error(id, file, line, text=None, *, error=RuleError, contains=(), fix="", process=False, **kw):
    """A rule file refused when it is loaded: the message starts with file:line."""
    where = at(file, line)
    return Case(id, _apply(file, **kw), error, where, where + text if text is not None else None, tuple(contains),
                fix, process=process)


def rule_error(id, file, label, text=None, *, error, contains=(), fix="", process=False, **kw):
    """A rule that fails against the model: the message names the rule and its file:line."""
    return Case(id, _apply(file, **kw), error, label, (label + text) if text is not None else None, tuple(contains),
                fix, process=process)


def label(n: int, rule: str, file: str, line: int) -> str:
    return f"rule {n} '{rule}' ({{R}}/{file}.yaml:{line})"


def model_error(id, argv, where, text=None, *, error=ModelError, contains=(), fix="", setup="", process=False):
    return Case(id, tuple(argv), error, where, (where + text) if text is not None else None, tuple(contains), fix,
                setup, process)


SYNTAX_FIX = "; fix: correct the YAML at that line (indentation, quotes, ':' after keys)"
ALLOW_FIX = "; fix: use a public torch/torchvision name, or allow its package with --allow-module"
NOT_CLASS_FIX = "; fix: name a class or function defined in torch/torchvision or an allowed module"
OPTIONAL_FIX = "; fix: correct the selector or add 'optional: true'"
EMPTY_FIX = "; fix: start it with 'fxsurgery: 1' and a 'rules:' list"
SELECTOR_FIX = "; fix: write a glob string, {type: torch.nn.ReLU}, {function: torch.relu} or {method: view}"
GLOB_FIX = "; fix: write a module path such as 'layer1.*' or '*'"
REGEX_FIX = "; fix: correct the pattern after 're:'"
PARAM_FIX = "; fix: declare it under 'params:' or correct the name"
WEIGHTS_FIX = "; fix: pass weights saved from this architecture"
INPUT_FIX = "; fix: write sizes joined by x, e.g. 1x3x224x224 (optionally :int64)"
SHAPE_FIX = "; fix: replace this layer too (fxs.new infers its input size), or insert a layer that maps the shape"
CONFLICT_FIX = "; fix: drop one of the two rules"
M, S = "{M}", "{M}:Small"


CASES = [
    # -- YAML syntax --------------------------------------------------------------------------
    load_error("yaml unclosed flow sequence", "syntax_unclosed_flow", 4,
               "YAML syntax error: expected ',' or ']', but got ':'" + SYNTAX_FIX),
    load_error("yaml tab indentation", "syntax_tab", 3,
               "YAML syntax error: found character '\\t' that cannot start any token" + SYNTAX_FIX),
    # the quote opens on line 4, the last line of the file; line 5 does not exist
    load_error("yaml unclosed quote", "syntax_unclosed_quote", 4, contains=["YAML syntax error"]),
    load_error("yaml colon in a plain value", "syntax_colon_in_plain", 3,
               "YAML syntax error: mapping values are not allowed here" + SYNTAX_FIX),
    load_error("yaml bad indentation", "syntax_bad_indent", 4,
               "YAML syntax error: expected <block end>, but found '<block mapping start>'" + SYNTAX_FIX),
    load_error("yaml duplicate key", "syntax_duplicate_key", 5, "YAML syntax error: duplicate key 'with'" + SYNTAX_FIX),
    load_error("yaml two documents", "syntax_two_documents", 4, contains=["YAML syntax error", "another document"]),
    load_error("yaml nested 2000 deep", "syntax_deep_nesting", 3, contains=["YAML"]),
    load_error("not utf-8 (latin-1 byte on line 2)", "latin1", 2, contains=["UTF-8"]),
    # each was an internal error: PyYAML's reader fails before parsing starts, Python refuses ints of 4300+ digits
    load_error("a control character", "syntax_control_char", 3,
               "character '\\x01' is not allowed in YAML; fix: remove it, or write it as an escape in a double-quoted string"),
    load_error("a number of 6000 digits", "value_huge_int", 4, "a number of 6000 digits is no size or setting; fix: write a number of at most 40 digits"),
    # -- the fxsurgery: version ----------------------------------------------------------------
    load_error("version 2", "version_2", 1, "unsupported version fxsurgery: 2; fix: write 'fxsurgery: 1'"),
    load_error("version as a string", "version_string", 2, "unsupported version fxsurgery: '1'; fix: write 'fxsurgery: 1'"),
    load_error("version true", "version_bool", 1, "unsupported version fxsurgery: True; fix: write 'fxsurgery: 1'"),
    load_error("version missing", "version_missing", 1, "missing 'fxsurgery: 1'; fix: add it as the first line"),
    # -- unknown keys, at every level -----------------------------------------------------------
    load_error("unknown key in the file", "key_top", 2, "unknown key 'rule' in the file; fix: did you mean 'rules'?"),
    load_error("unknown key in a rule", "key_rule", 4, "unknown key 'optinal' in 'delete' rule; fix: did you mean 'optional'?"),
    load_error("unknown key in a replace rule", "key_replace", 5,
               "unknown key 'weight' in 'replace' rule; fix: did you mean 'weights'?"),
    load_error("unknown key in a freeze rule", "key_freeze", 4,
               "unknown key 'exclude' in 'freeze' rule; fix: did you mean 'except'?"),
    load_error("unknown key in detach", "key_detach", 3, "unknown key 'name' in 'detach'; fix: allowed: after, before"),
    load_error("unknown argument in insert", "key_insert_kwarg", 3,
               "torch.nn.Dropout does not take 'prob'; fix: use its arguments (p, inplace)"),
    # `with:` in block style: the unknown argument sits on line 6, not on the `with:` line
    load_error("unknown argument in with (block style)", "key_with_kwarg", 6,
               "torch.nn.Linear does not take 'outfeatures'; fix: use its arguments (in_features, out_features, bias)"),
    load_error("unknown key in a selector", "key_selector", 3,
               "bad selector {'type': 'torch.nn.ReLU', 'path': 'fc'}" + SELECTOR_FIX),
    load_error("extra key beside function", "key_function_extra", 4,
               "a function replacement takes no other keys; fix: keep only 'function:'"),
    # -- wrong value types ------------------------------------------------------------------------
    load_error("rules is a mapping", "type_rules_mapping", 2,
               "'rules' must be a non-empty list; fix: add rules such as '- delete: layer4'"),
    load_error("description is a list", "type_description", 2, "description must be text; fix: quote it"),
    load_error("params is a list", "type_params", 2,
               "params must be a mapping of name: default; fix: e.g. 'params: {num_classes: 10}'"),
    load_error("optional is a string", "type_optional", 4, "'optional' must be true or false, got 'yes'; fix: write 'optional: true'"),
    load_error("selector is a number", "type_selector_int", 3, "bad selector 3" + SELECTOR_FIX),
    load_error("except is a number", "type_except_int", 4,
               "'except' must be a list of selectors; fix: e.g. except: ['layer4.*', fc]"),
    load_error("detach takes a string", "type_detach_string", 3, "detach takes a mapping; fix: e.g. 'detach: {after: layer3}'"),
    load_error("with is a string", "type_with_string", 4,
               "expected {module: torch.nn.X, ...} or {function: ...}, got 'torch.nn.GELU'; fix: e.g. 'with: {module: torch.nn.GELU}'"),
    load_error("weights is a number", "type_weights_int", 5, "unknown weights policy 1; fix: use one of new, keep, slice, pad, "
               "adapt_input_channels, or {select: [row indices]}"),
    load_error("rule is a string", "type_rule_string", 3,
               "a rule is a mapping such as '- delete: layer4', got 'delete fc'; fix: start each rule with one of delete, replace, insert, detach, freeze, layers, rewrite, use, output, prune"),
    *(load_error(f"insert name {shown}", f"type_insert_name{suffix}", 3, f"insert name {shown} is not a module path of free names (no "
                 "Python keyword, no attribute every module has, such as forward or training); fix: use identifiers joined by dots, e.g. head_norm")
      for shown, suffix in (("'drop out'", ""), ("'class'", "_class"), ("'forward'", "_forward"), ("5", "_5"))),
    # a value the class rejects is found when the file is loaded, on the line of the `with:`
    load_error("out_features is text", "type_out_features", 4,
               "torch.nn.Linear(out_features='ten') is rejected: empty(): argument 'size' (position 1) must be tuple of ints, "
               "but found element of type str at pos 0; fix: change the arguments"),
    # -- params -------------------------------------------------------------------------------------
    load_error("unknown ${param}", "param_unknown", 5, "unknown param ${num_clases} (declared: num_classes)" + PARAM_FIX),
    # the default was filled with the file's internal token for ${n}: "Linear(out_features='__fxsparam_6e__') is rejected"
    load_error("a param defaulting to itself", "param_self", 2,
               "param 'n' defaults to '${n}', a param; params do not refer to params; fix: give it a value of its own"),
    load_error("empty ${}", "param_empty", 3, "unknown param ${} (declared: none)" + PARAM_FIX),
    load_error("undeclared ${param} inside a string", "param_inline", 4, "unknown param ${n} (declared: none)" + PARAM_FIX),
    model_error("--set of an undeclared param", _apply("param_ok", extra=["--set", "bogus=1"]), "{R}/param_ok.yaml: ",
                "unknown param 'bogus' (the file declares: num_classes); fix: use a declared name or add it under 'params:'",
                error=RuleError),
    model_error("--set without =", _apply("param_ok", extra=["--set", "novalue"]), "--set 'novalue': ",
                "expected NAME=VALUE; fix: e.g. --set num_classes=37", error=RuleError),
    load_error("--set value of the wrong type", "param_ok", 5,
               "torch.nn.Linear(out_features='ten') is rejected: empty(): argument 'size' (position 1) must be tuple of ints, "
               "but found element of type str at pos 0; fix: change the arguments", extra=["--set", "num_classes=ten"]),
    # torch builds Linear(512, 0) without a word: a head for no classes is a typo
    load_error("--set a size of 0", "param_ok", 5,
               "torch.nn.Linear(out_features=0) builds an empty weight (a size of 0), which computes nothing; fix: give sizes of 1 or more",
               extra=["--set", "num_classes=0"]),
    # -- globs and regular expressions ----------------------------------------------------------
    load_error("bad regular expression", "sel_bad_regex", 3,
               "bad regular expression 're:layer(': missing ), unterminated subpattern at position 5" + REGEX_FIX),
    load_error("regular expression with a repeated group", "sel_regex_group", 3,
               "bad regular expression 're:(?P<a>layer1)(?P<a>.*)': redefinition of group name 'a' as group 2; was group 1 at position 17" + REGEX_FIX),
    load_error("glob padded with a space", "sel_padded_glob", 3, "bad glob 'fc ': empty or padded with spaces" + GLOB_FIX),
    load_error("empty glob", "sel_empty_glob", 3, "bad glob '': empty or padded with spaces" + GLOB_FIX),
    load_error("method name with a space", "sel_bad_method", 3, "bad method selector 'method:vi ew'; fix: write method:NAME, e.g. method:view"),
    rule_error("glob with an open bracket", "sel_glob_bracket", label(1, "delete layer[", "sel_glob_bracket", 3),
               " matched nothing: no module path or node name matches 'layer['; closest: layer4, layer3, layer2" + OPTIONAL_FIX,
               error=MatchError),
    rule_error("regular expression matching nothing", "sel_regex_nothing", label(1, "delete re:conv9", "sel_regex_nothing", 3),
               " matched nothing: no module path or node name matches 're:conv9'; closest: conv1" + OPTIONAL_FIX, error=MatchError),
    # -- selectors matching nothing ---------------------------------------------------------------
    rule_error("path matching nothing", "nothing_glob", label(1, "delete fcc", "nothing_glob", 3),
               " matched nothing: no module path or node name matches 'fcc'; closest: fc" + OPTIONAL_FIX,
               error=MatchError, process=True),
    rule_error("type matching nothing", "nothing_type", label(1, "replace torch.nn.LSTM with GRU(input_size=4, hidden_size=4)", "nothing_type", 3),
               " matched nothing: no module of type LSTM (types present: AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Conv2d, "
               "Linear, MaxPool2d, ReLU, ResNet)" + OPTIONAL_FIX, error=MatchError),
    # the rule names torch.sigmoid and torch.tanh as the file writes them
    rule_error("function matching nothing", "nothing_function", label(1, "replace torch.sigmoid with torch.tanh", "nothing_function", 3),
               error=MatchError, contains=["matched nothing: no call of torch.sigmoid"]),
    rule_error("method matching nothing", "nothing_method", label(1, "delete method:view", "nothing_method", 3),
               " matched nothing: no call of method view (methods called: none)" + OPTIONAL_FIX, error=MatchError),
    rule_error("freeze matching nothing", "nothing_freeze", label(1, "freeze layer9.*", "nothing_freeze", 3),
               " matched nothing: no module path or node name matches 'layer9.*'; closest: layer4.1, layer4.0, layer3.1" + OPTIONAL_FIX,
               error=MatchError),
    rule_error("freeze with everything excluded", "nothing_excluded", label(1, "freeze fc except fc", "nothing_excluded", 3),
               " matched nothing: every selected parameter is excluded" + OPTIONAL_FIX, error=MatchError),
    rule_error("detach matching nothing", "nothing_detach", label(1, "detach after layer7", "nothing_detach", 3),
               " matched nothing: no module path or node name matches 'layer7'; closest: layer4, layer3, layer2" + OPTIONAL_FIX,
               error=MatchError),
    # without example inputs an untraceable forward stays opaque: its calls are unseen, not absent
    rule_error("selector inside opaque code, no --input", "delete_fc1", label(1, "delete fc1", "delete_fc1", 3), error=MatchError,
               model="{M}:Branchy", inputs=None, contains=["opaque"]),
    # -- the allowlist ----------------------------------------------------------------------------
    load_error("os.system", "allow_os_system", 4, "'os.system' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " os", process=True),
    load_error("builtins.eval", "allow_builtins_eval", 4, "'builtins.eval' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " builtins"),
    load_error("escape through torch.serialization.pickle", "allow_escape", 4,
               "'torch.serialization.pickle.Unpickler' is not a class or function of an allowed package" + NOT_CLASS_FIX),
    load_error("private torch name", "allow_private", 4, "'torch._C._nn.gelu' is a private name, which rule files cannot reach; "
               "fix: use a public name, e.g. torch.nn.functional.gelu"),
    load_error("a module object", "allow_module_object", 4, "'torch.nn' is not a class or function of an allowed package" + NOT_CLASS_FIX),
    load_error("not a dotted name", "allow_not_dotted", 4, "'torch.nn.Linear()' is not a dotted name; fix: write e.g. torch.nn.Linear"),
    load_error("type selector outside the allowlist", "allow_selector_type", 3,
               "'subprocess.Popen' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " subprocess"),
    load_error("package not allowed", "allow_pkg_missing", 4,
               "'fxsurgery_no_such_pkg.Head' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " fxsurgery_no_such_pkg"),
    load_error("allowed package not installed", "allow_pkg_missing", 4,
               "cannot import 'fxsurgery_no_such_pkg'; fix: install it or correct the name",
               extra=["--allow-module", "fxsurgery_no_such_pkg"]),
    # -- classes and functions that do not exist -------------------------------------------------
    load_error("misspelt class", "missing_class", 4, "'torch.nn.Linearr' does not exist; fix: did you mean torch.nn.Linear?"),
    load_error("torchvision class that does not exist", "missing_torchvision", 3,
               "'torchvision.ops.NoSuchOp' does not exist; fix: check the spelling"),
    load_error("misspelt function", "missing_function", 4,
               "'torch.nn.functional.gelux' does not exist; fix: did you mean torch.nn.functional.gelu?"),
    load_error("function named as module", "function_as_module", 4,
               "'torch.relu' is not a torch.nn.Module class; fix: name a Module class such as torch.nn.GELU"),
    load_error("class named as function", "class_as_function", 4,
               "'torch.nn.GELU' is not a function; fix: name a function such as torch.nn.functional.gelu, or use 'module:' for a class"),
    # -- pattern rules (rewrite:, use:, output:) ----------------------------------------------------
    load_error("unknown built-in rewrite", "rewrite_unknown", 3, "unknown rewrite 'fold_batchnorm'; fix: did you mean 'fold_bn'?"),
    load_error("built-in param the pattern rejects", "rewrite_bad_param", 3,
               "AddLoRA(rank=0) fails: rank must be a positive integer, got 0; fix: correct its params"),
    load_error("built-in param that does not exist", "rewrite_unknown_param", 3,
               "fxsurgery.AddLoRA does not take 'rnk'; fix: use its arguments (rank, alpha)"),
    load_error("use: outside the allowlist", "use_not_allowed", 3,
               "'os.path.join' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " os"),
    load_error("use: of something that is not a Pattern", "use_not_pattern", 3,
               "'torch.nn.ReLU' is not a Pattern; fix: name a fxsurgery.Pattern subclass or a function decorated with @fxsurgery.pattern(...)"),
    load_error("chain rewrite without with:", "rewrite_chain_no_with", 3,
               "a chain rewrite needs 'pattern: [...]' and 'with: {module: ...}'; fix: e.g. {pattern: [torch.nn.Conv2d, torch.nn.ReLU], with: {module: torch.nn.Identity}}"),
    load_error("chain element outside the allowlist", "rewrite_chain_escape", 3,
               "'os.system' is outside the allowlist (torch, torchvision)" + ALLOW_FIX + " os"),
    load_error("select by type", "rewrite_select_type", 4,
               "select is a glob or 're:REGEX' over module paths; fix: e.g. select: 're:.*attn.*'"),
    load_error("swap to a function", "rewrite_to_function", 4,
               "'torch.relu' is not a torch.nn.Module class; fix: name a Module class such as torch.nn.GELU"),
    rule_error("pattern matching nothing", "rewrite_nothing",
               label(1, "rewrite fold_linear_bn (linear + batchnorm1d -> linear)", "rewrite_nothing", 3),
               " matched nothing: every candidate was left alone: fc (Linear) is followed by output (output), not "
               "torch.nn.BatchNorm1d" + OPTIONAL_FIX, error=MatchError),
    load_error("output name given twice", "output_name_twice", 3,
               "output name 'feat' is given twice; fix: give each output its own name"),
    # -- constructor arguments the class rejects (checked when the file is loaded) ---------------
    load_error("unknown constructor argument", "ctor_unknown_kwarg", 4,
               "torch.nn.Linear does not take 'bias_init'; fix: use its arguments (in_features, out_features, bias)"),
    load_error("Dropout(p=2.0)", "ctor_bad_value", 3, contains=["Dropout", "2.0"]),
    load_error("Conv2d without kernel_size", "ctor_missing_required", 4, contains=["Conv2d", "kernel_size"]),
    # RNN's __init__ is quadratic in its layers: 124 bytes of YAML ran for days, even on the meta device
    load_error("RNN(num_layers=10**8)", "ctor_layers", 4,
               "torch.nn.RNN(num_layers=100000000) declares more than 1024 layers; fix: give sizes that fit"),
    load_error("Linear(out_features=-3)", "ctor_negative", 4,
               "torch.nn.Linear(out_features=-3) is rejected: Trying to create tensor with negative dimension -3: [-3, 8]; "
               "fix: change the arguments"),
    # -- shapes that do not fit -------------------------------------------------------------------
    rule_error("replace with a fixed in_features", "shape_replace_linear",
               label(1, "replace fc with Linear(in_features=100, out_features=3)", "shape_replace_linear", 3),
               " at node 'fc' [call_module]: Linear(in_features=100, out_features=3, bias=True) does not fit the incoming shape "
               "[1, 512]; fix: drop the shape argument and let it be inferred (fxs.new), or set it to match [1, 512]",
               error=ValidateError),
    rule_error("delete a conv its batchnorm needs", "shape_delete_conv", label(1, "delete layer2.0.conv1", "shape_delete_conv", 3),
               " at node 'layer2_0_bn1' [call_module]: {bn128} does not fit the incoming shape [1, 64, 16, 16]" + SHAPE_FIX,
               error=ValidateError),
    rule_error("insert a conv with the wrong in_channels", "shape_insert_conv",
               label(1, "insert Conv2d(in_channels=3, out_channels=512, kernel_size=1) after avgpool", "shape_insert_conv", 3),
               " at node 'avgpool_conv2d' [call_module]: Conv2d(3, 512, kernel_size=(1, 1), stride=(1, 1)) does not fit the "
               "incoming shape [1, 512, 1, 1]; fix: drop the shape argument and let it be inferred (fxs.new), or set it to match [1, 512, 1, 1]",
               error=ValidateError),
    rule_error("replace the stem with fewer channels", "shape_replace_conv1",
               label(1, "replace conv1 with Conv2d(out_channels=32, kernel_size=3)", "shape_replace_conv1", 3),
               " at node 'bn1' [call_module]: {bn64} does not fit the incoming shape [1, 32, 62, 62]" + SHAPE_FIX, error=ValidateError),
    # -- rewrites that cannot be made --------------------------------------------------------------
    rule_error("delete a residual add", "delete_add", label(1, "delete add", "delete_add", 3),
               " at 'add': it reads 2 tensors (layer1_0_bn2, maxpool), so there is no single input to pass on; "
               "fix: replace it instead, or select a node with one input", error=RewriteError, process=True),
    rule_error("delete a concatenation", "delete_cat", label(1, "delete cat", "delete_cat", 3),
               " at 'cat': it reads 2 tensors (add, fc2), so there is no single input to pass on; "
               "fix: replace it instead, or select a node with one input", error=RewriteError, model="{M}:Residual", inputs=VEC),
    # Identity takes one tensor: replacing a call of two with it must not silently drop the second
    rule_error("replace a residual add with a one-input module", "replace_add", label(1, "replace add with Identity()", "replace_add", 3),
               error=RewriteError),
    rule_error("detach an int", "detach_size", label(1, "detach after size", "detach_size", 3),
               " at 'size': value 'size' has type int, not Tensor; only tensors carry gradients; fix: detach a node whose value is a tensor",
               error=RewriteError, model="{M}:Sized", inputs=VEC),
    rule_error("keep weights of another shape", "keep_mismatch", label(1, "replace fc with Linear(out_features=10)", "keep_mismatch", 3),
               ": weights 'keep' cannot fill fc.weight [10, 512]: the replaced module has [1000, 512] there; fix: use weights: new",
               error=TransferError),
    # -- freezing a module without parameters: a warning, exit status 0 ----------------------------
    Case("freeze a ReLU", _apply("freeze_relu", extra=["--dry-run"]), None,
         label(1, "freeze relu", "freeze_relu", 3) + ": relu has no parameters; nothing to freeze"),
    Case("freeze every ReLU", _apply("freeze_relu_type", extra=["--dry-run"]), None,
         label(1, "freeze torch.nn.ReLU", "freeze_relu_type", 3) + ": relu, layer1.0.relu, layer1.1.relu have no parameters; nothing to freeze"),
    # freeze acts on modules' parameters: a method selector can never select one
    load_error("freeze by a method selector", "freeze_method", 3, model="{M}:Sized", inputs=VEC),
    # -- conflicting rules --------------------------------------------------------------------------
    rule_error("delete then replace", "conflict_delete_replace",
               label(2, "replace fc with Linear(out_features=10)", "conflict_delete_replace", 4),
               " conflicts with " + label(1, "delete fc", "conflict_delete_replace", 3) + ": node 'fc' was already deleted" + CONFLICT_FIX,
               error=MatchError),
    rule_error("replace then delete", "conflict_replace_delete", label(2, "delete fc", "conflict_replace_delete", 5),
               " conflicts with " + label(1, "replace fc with Linear(out_features=10)", "conflict_replace_delete", 3)
               + ": node 'fc' was already replaced" + CONFLICT_FIX, error=MatchError),
    rule_error("delete then detach", "conflict_delete_detach", label(2, "detach after layer4", "conflict_delete_detach", 4),
               " conflicts with " + label(1, "delete layer4", "conflict_delete_detach", 3) + ": node 'layer4_0_conv1' was already deleted"
               + CONFLICT_FIX, error=MatchError),
    rule_error("conflict across two files", ("conflict_a", "conflict_b"),
               label(3, "replace avgpool with AdaptiveMaxPool2d(output_size=1)", "conflict_b", 4),
               " conflicts with " + label(1, "delete avgpool", "conflict_a", 3) + ": node 'avgpool' was already deleted" + CONFLICT_FIX,
               error=MatchError),
    # -- empty or not a rule file --------------------------------------------------------------------
    load_error("empty file", "empty", None, "the rule file is empty" + EMPTY_FIX),
    load_error("comments only", "comments_only", None, "the rule file is empty" + EMPTY_FIX),
    load_error("empty rules list", "rules_empty_list", 3, "'rules' must be a non-empty list; fix: add rules such as '- delete: layer4'"),
    load_error("rules: with nothing", "rules_null", 2, "'rules' must be a non-empty list; fix: add rules such as '- delete: layer4'"),
    # the type is the user's word for it: a list, not the loader's own class
    load_error("a list at the top", "top_list", 1, "a rule file is a mapping, got a list" + EMPTY_FIX),
    load_error("a string at the top", "top_scalar", 1, "a rule file is a mapping, got a str" + EMPTY_FIX),
    model_error("rule file that does not exist", _apply("no_such_rules"), "{R}/no_such_rules.yaml: ",
                "cannot read rule file: No such file or directory; fix: check the path", error=RuleError),
    model_error("rule file is a directory", ("apply", RESNET, "{R}", IMG, "-o", "{OUT}"), "{R}: ",
                "not a regular file; fix: pass a rule file (.yaml)", error=RuleError),
    # -- model references -----------------------------------------------------------------------
    model_error("package that cannot be imported", _apply("ok_resnet", model="nonexistent_pkg.models:net"), "nonexistent_pkg.models:net: ",
                "cannot import 'nonexistent_pkg.models': No module named 'nonexistent_pkg'; fix: install the package or correct the name"),
    model_error("factory that does not exist", _apply("ok_resnet", model="torchvision.models:resnet_nope"),
                "torchvision.models:resnet_nope: ", contains=["has no attribute 'resnet_nope'"]),
    # the names sharing three letters, alphabetically, were offered: ResNeXt101_32X8D_Weights for resnet81
    model_error("factory misspelled", _apply("ok_resnet", model="torchvision.models:resnt18"), "torchvision.models:resnt18: ",
                "torchvision.models has no attribute 'resnt18'; fix: did you mean resnet18, ResNet, resnet152?"),
    # the package's own name for where its models live, found among the submodules it has already imported
    # read as a path that does not exist
    model_error("a device as the model", _apply("ok_resnet", model="/dev/zero"), "/dev/zero: ",
                "is not a regular file; fix: name the model (package.module:factory, path/file.py:Name or a saved directory)"),
    model_error("factory named on the package", _apply("ok_resnet", model="torchvision:resnet18"), "torchvision:resnet18: ",
                "torchvision has no attribute 'resnet18'; fix: did you mean torchvision.models:resnet18?"),
    model_error("class that needs arguments", _apply("ok_resnet", model="torch.nn:Linear"), "torch.nn:Linear: ",
                "needs arguments to build a model; fix: name a factory that takes none (wrap it in a function in a .py file)"),
    model_error("factory returning a list", _apply("ok_resnet", model="torchvision.models:list_models"), "torchvision.models:list_models: ",
                "returned a list, not a torch.nn.Module; fix: name a factory that returns a model"),
    model_error("file attribute that is a dict", _apply("ok_small", model="{M}:CONFIG", inputs=VEC), "{M}:CONFIG: ",
                "is a dict, not a model, a model class or a factory; fix: name an nn.Module class or a function returning one"),
    model_error("file class that needs arguments", _apply("ok_small", model="{M}:NeedsArgs", inputs=VEC), "{M}:NeedsArgs: ",
                "needs arguments to build a model; fix: name a factory that takes none (wrap it in a function in a .py file)"),
    model_error("factory that raises", _apply("ok_small", model="{M}:raises_on_build", inputs=VEC), "{M}:raises_on_build: ",
                "building the model failed: RuntimeError: no weights for this configuration; fix: check the factory"),
    model_error("factory returning an int", _apply("ok_small", model="{M}:returns_int", inputs=VEC), "{M}:returns_int: ",
                contains=["not a torch.nn.Module"]),
    model_error("file without that name", _apply("ok_small", model="{M}:Missing", inputs=VEC), "{M}:Missing: ",
                "{M} has no attribute 'Missing'; fix: check the name"),
    model_error("model file that does not exist", _apply("ok_small", model="{B}/nope.py:Net", inputs=VEC), "{B}/nope.py:Net: ",
                "file {B}/nope.py does not exist; fix: check the path"),
    model_error("model file with a syntax error", _apply("ok_small", model="{W}/syntax_error.py:Net", inputs=VEC),
                "{W}/syntax_error.py:Net: ", contains=["importing {W}/syntax_error.py failed: SyntaxError"]),
    model_error("model file whose import fails", _apply("ok_small", model="{B}/bad_import.py:Net", inputs=VEC), "{B}/bad_import.py:Net: ",
                "importing {B}/bad_import.py failed: ModuleNotFoundError: No module named 'fxsurgery_no_such_dependency'; "
                "fix: run the file with python to see why"),
    model_error("path that does not exist", _apply("ok_small", model="{B}/no_such_model", inputs=VEC), "{B}/no_such_model: ",
                "no such file or directory, and not of the form package.module:factory; fix: e.g. torchvision.models:resnet18"),
    # a .py file named without ':Name' is source, not a pickle: the fix is to name the class
    model_error("python file without :Name", _apply("ok_small", model="{M}", inputs=VEC), "{M}: ", fix=".py:"),
    model_error("directory not written by save", _apply("ok_small", model="{B}", inputs=VEC), "{B}: ",
                "not an fxsurgery output (missing model.py, model.safetensors, surgery.json); fix: pass a directory written by save()",
                error=SaveError),
    model_error("empty module part", _apply("ok_small", model=":Small", inputs=VEC), ":Small: ", process=True),
    model_error("model rejects the input", _apply("ok_small", model=S, inputs="--input=1x3x32x32"), "the original model fails on the example inputs: ",
                "RuntimeError: mat1 and mat2 shapes cannot be multiplied (96x32 and 4x8); fix: pass inputs the original model accepts"),
    model_error("resnet18 at 1x3x32x32 in training mode", _apply("ok_resnet", inputs="--input=1x3x32x32"),
                "the original model fails on the example inputs: ",
                "ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 512, 1, 1]); "
                "fix: example inputs with a batch of 2 or more (--input 2x...), or the model in eval mode (--eval)"),
    model_error("two inputs for a one-input forward", _apply("ok_resnet", extra=["--input=1x3"]), "example inputs do not fit ResNet.forward(x): ",
                "too many positional arguments; fix: pass one input per argument"),
    # written out at save time: the part that stays Python cannot become model.py
    Case("module name with a quote", _apply("ok_small", model="{M}:Quoted", inputs=VEC), SaveError, "'fc\"2'",
         contains=("module path 'fc\"2' contains a quote",)),
    Case("untraceable forward, written out", _apply("ok_small", model="{M}:Branchy", inputs=VEC), SaveError, "Branchy",
         contains=("symbolically traced variables cannot be used as inputs to control flow",)),
    # -- weights files ----------------------------------------------------------------------------
    model_error("truncated safetensors", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/truncated.safetensors"]),
                "{W}/truncated.safetensors: ", contains=["cannot read weights"], process=True),
    model_error("not safetensors", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/png.safetensors"]),
                "{W}/png.safetensors: ", "cannot read weights: Error while deserializing header: header too large; "
                "fix: pass a complete .safetensors file (or a weights-only .pt)"),
    model_error("empty weights file", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/empty.safetensors"]),
                "{W}/empty.safetensors: ", contains=["cannot read weights"]),
    model_error("text file as .pt", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/text.pt"]), "{W}/text.pt: "),
    model_error("a list saved as .pt", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/list.pt"]), "{W}/list.pt: ",
                "does not hold a state dict of tensors; fix: save model.state_dict() to safetensors"),
    model_error("weights of another shape", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/shape.safetensors"]),
                "{W}/shape.safetensors: ", "does not fit the model: wrong shape 1 (fc1.weight [3, 3] != [8, 4])" + WEIGHTS_FIX),
    model_error("weights missing a tensor", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/missing.safetensors"]),
                "{W}/missing.safetensors: ", "does not fit the model: missing 1 (fc2.bias)" + WEIGHTS_FIX),
    model_error("weights with an extra tensor", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/extra.safetensors"]),
                "{W}/extra.safetensors: ", "does not fit the model: unexpected 1 (extra)" + WEIGHTS_FIX),
    model_error("weights with a partial module. prefix", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/prefix.safetensors"]),
                "{W}/prefix.safetensors: ", contains=["start with 'module.'"]),
    # a strict load must not cast: float16, int32 and float64 tensors are not the model's float32
    model_error("float16 weights", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/float16.safetensors"]),
                "{W}/float16.safetensors: ", contains=["float16", "fix: build the model in float16 (a factory returning "
                                                       "model.to(torch.float16)), or convert the checkpoint: nothing is cast silently"]),
    model_error("int32 weights", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/int32.safetensors"]),
                "{W}/int32.safetensors: ", contains=["int32"]),
    model_error("float64 weights in a .pt", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/float64.pt"]),
                "{W}/float64.pt: ", contains=["float64"]),
    model_error("weights file that does not exist", _apply("ok_small", model=S, inputs=VEC, extra=["--weights", "{W}/nope.safetensors"]),
                "{W}/nope.safetensors: ", "no such weights file; fix: check the path"),
    # -- --input strings --------------------------------------------------------------------------
    model_error("--input with a letter", _apply("ok_resnet", inputs="--input=1x3xA"), "--input '1x3xA': ", "cannot parse '1x3xA'" + INPUT_FIX),
    model_error("--input with an unknown dtype", _apply("ok_resnet", inputs="--input=1x3x64x64:float8"), "--input '1x3x64x64:float8': ",
                "cannot parse '1x3x64x64:float8'" + INPUT_FIX),
    model_error("--input empty", _apply("ok_resnet", inputs="--input="), "--input '': ", "cannot parse ''" + INPUT_FIX),
    # was 'too many positional arguments; fix: pass one input per argument': the shape was taken for four inputs
    model_error("--input as a tuple", _apply("ok_resnet", inputs="--input=1,3,64,64"), "--input '1,3,64,64': ",
                "commas separate inputs, so this is 4 inputs of one size each; fix: join one input's sizes with x: --input 1x3x64x64 "
                "(or repeat --input for one-dimensional inputs)"),
    model_error("--input negative", _apply("ok_resnet", inputs="--input=-1x3"), "--input '-1x3': ", "cannot parse '-1x3'" + INPUT_FIX),
    model_error("--input trailing x", _apply("ok_resnet", inputs="--input=1x3x64x64x"), "--input '1x3x64x64x': ",
                "cannot parse '1x3x64x64x'" + INPUT_FIX),
    model_error("--input with a semicolon", _apply("ok_resnet", inputs="--input=1x3x64x64;"), "--input '1x3x64x64;': ",
                "cannot parse '1x3x64x64;'" + INPUT_FIX),
    model_error("--input too large to allocate", _apply("ok_resnet", inputs="--input=99999999999x99999999999"),
                "--input '99999999999x99999999999': "),
    # -- output paths -----------------------------------------------------------------------------
    model_error("output directory exists", _apply("ok_resnet"), "{OUT}: ",
                "already exists; fix: choose another output directory or pass --force", error=SaveError, setup="dir"),
    model_error("output is an existing file", _apply("ok_resnet"), "{OUT}: ",
                "already exists; fix: choose another output directory or pass --force", error=SaveError, setup="file"),
    model_error("output under a file", _apply("ok_resnet"), "{OUT}: ", "{UNDER} is a file, not a directory; "
                "fix: choose another output path", error=SaveError, setup="under-file"),
    model_error("--force on a directory fxsurgery did not write", _apply("ok_resnet", extra=["--force"]), "{OUT}: ",
                "exists and is not an fxsurgery output, refusing to replace it; fix: choose another output directory",
                error=SaveError, setup="dir"),
    # -- the other commands -----------------------------------------------------------------------
    Case("check: yaml syntax", ("check", "{R}/syntax_tab.yaml"), RuleError, at("syntax_tab", 3),
         at("syntax_tab", 3) + "YAML syntax error: found character '\\t' that cannot start any token" + SYNTAX_FIX),
    Case("check: Dropout(p=2.0)", ("check", "{R}/ctor_bad_value.yaml"), RuleError, at("ctor_bad_value", 3),
         contains=("Dropout", "2.0")),
    Case("inspect: class that needs arguments", ("inspect", "{M}:NeedsArgs", VEC), ModelError, "{M}:NeedsArgs: ",
         "{M}:NeedsArgs: needs arguments to build a model; fix: name a factory that takes none (wrap it in a function in a .py file)"),
    Case("inspect: --input that cannot be parsed", ("inspect", RESNET, "--input=3x"), ModelError, "--input '3x': ",
         "--input '3x': cannot parse '3x'" + INPUT_FIX),
    Case("map-weights: truncated checkpoint", ("map-weights", "{W}/truncated.safetensors", "{W}/saved", "-o", "{OUT}"), ModelError,
         "{W}/truncated.safetensors: ", contains=("cannot read weights",)),
    Case("map-weights: not a saved directory", ("map-weights", "{W}/small.safetensors", "{B}", "-o", "{OUT}"), SaveError, "{B}: ",
         "{B}: not an fxsurgery output (missing model.py, model.safetensors, surgery.json); fix: pass a directory written by save()"),
    Case("map-weights: checkpoint of another shape", ("map-weights", "{W}/shape.safetensors", "{W}/saved", "-o", "{OUT}"), SaveError,
         "'fc1.weight'", "the checkpoint's 'fc1.weight' has shape [3, 3], the surgery read [8, 4]; fix: pass a checkpoint of the original architecture"),
    Case("map-weights: output exists", ("map-weights", "{W}/small.safetensors", "{W}/saved", "-o", "{OUT}"), SaveError, "{OUT}: ",
         "{OUT}: already exists; fix: choose another output file or pass --force (force=True)", setup="file"),
    Case("map-weights: output under a file", ("map-weights", "{W}/small.safetensors", "{W}/saved", "-o", "{OUT}"), SaveError, "{OUT}: ",
         "{OUT}: {UNDER} is a file, not a directory; fix: choose another output path", setup="under-file"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Binary inputs, written once: weights of bad_inputs/models.py:Small and friends."""
    w = tmp_path_factory.mktemp("bad_weights")
    torch.manual_seed(0)
    small = _models().Small()
    state = small.state_dict()
    save_file(state, str(w / "small.safetensors"))
    data = (w / "small.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (w / "png.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(56))
    (w / "empty.safetensors").write_bytes(b"")
    (w / "text.pt").write_text("these are not weights\n")
    torch.save([1, 2, 3], w / "list.pt")
    save_file({k: (torch.zeros(3, 3) if k == "fc1.weight" else v) for k, v in state.items()}, str(w / "shape.safetensors"))
    save_file({k: v for k, v in state.items() if k != "fc2.bias"}, str(w / "missing.safetensors"))
    save_file({**state, "extra": torch.zeros(1)}, str(w / "extra.safetensors"))
    save_file({(f"module.{k}" if k.startswith("fc1") else k): v for k, v in state.items()}, str(w / "prefix.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(w / "float16.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(w / "int32.safetensors"))
    torch.save({k: v.double() for k, v in state.items()}, w / "float64.pt")
    (w / "syntax_error.py").write_text("from torch import nn\n\n\nclass Net(nn.Module:\n    pass\n")
    fxs.apply(small, [Freeze("fc1")], example_inputs=(torch.randn(2, 4),)).save(w / "saved")
    return w


def _models():
    """bad_inputs/models.py as a module (it is data, not a package)."""
    spec = importlib.util.spec_from_file_location("_bad_inputs_models", MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def recording():
    """Run the CLI in-process, keeping the exception each command raised (main() turns it into a line)."""
    raised = []
    names = [n for n in dir(cli_module) if n.startswith("cmd_")]
    originals = {n: getattr(cli_module, n) for n in names}

    def wrap(fn):
        def command(args):
            try:
                return fn(args)
            except BaseException as exc:
                raised.append(exc)
                raise
        return command

    for n in names:
        setattr(cli_module, n, wrap(originals[n]))
    try:
        yield raised
    finally:
        for n, fn in originals.items():
            setattr(cli_module, n, fn)


def run_cli(argv):
    """(exit status, stdout, stderr, the exception the command raised or None)."""
    out, err = io.StringIO(), io.StringIO()
    with recording() as raised, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main(list(argv))
    return code, out.getvalue(), err.getvalue(), (raised[0] if raised else None)


def environment(tmp: Path, scratch: Path, case: Case) -> dict:
    name = "out.safetensors" if case.argv[0] == "map-weights" else "out"  # map-weights writes one safetensors file
    out = tmp / ("afile/" + name if case.setup == "under-file" else name)
    return {"R": RULES, "M": MODELS, "B": BAD, "W": scratch, "OUT": out, "UNDER": tmp / "afile",
            "bn64": repr(nn.BatchNorm2d(64)), "bn128": repr(nn.BatchNorm2d(128))}


def prepare(tmp: Path, case: Case, out: Path) -> None:
    if case.setup == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case.setup == "file":
        out.write_text("user data")
    elif case.setup == "under-file":
        (tmp / "afile").write_text("user data")


def assert_nothing_written(tmp: Path, case: Case, out: Path) -> None:
    if case.setup == "dir":
        assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    elif case.setup == "file":
        assert out.read_text() == "user data"
    elif case.setup == "under-file":
        assert (tmp / "afile").read_text() == "user data"
    else:
        assert not out.exists(), f"{out} was written"
    leftovers = [p for p in os.listdir(tmp) if p.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def check_case(case: Case, tmp: Path, scratch: Path) -> None:
    """Every assertion of one case (shared with the figures test)."""
    env = environment(tmp, scratch, case)
    out = env["OUT"]
    prepare(tmp, case, out)
    argv = [fill(a, env) for a in case.argv]
    where = fill(case.where, env)
    code, stdout, stderr, exc = run_cli(argv)

    if case.error is None:  # a warning, not an error
        assert (code, stderr) == (0, ""), stderr
        assert "\nwarnings:\n  " + where + "\n" in stdout
        assert not out.exists()
        return

    assert exc is not None, f"no error raised (exit status {code}); stdout ends {stdout[-300:]!r}"
    message = str(exc)
    assert type(exc) is case.error, f"{type(exc).__name__}: {message}"
    assert "\n" not in message and len(message) <= 300, message
    assert where in exc.full, exc.full  # (what a message of over 300 characters says before it is bounded)
    assert FIX.search(message) and message.count("; fix: ") == 1, message
    if case.message is not None:  # as written, then bounded to 300 characters as every message is
        assert message == bounded(fill(case.message, env))
    for part in case.contains:
        assert fill(part, env) in exc.full, exc.full
    if case.fix:
        assert fill(case.fix, env) in message.partition("; fix: ")[2], message
    assert code == 2
    assert stderr == f"fxsurgery: error: {message}\n"
    assert "Traceback" not in stderr and stdout == ""
    assert_nothing_written(tmp, case, out)

    if case.process:
        code, stdout, stderr = cli_process(*argv)
        assert code == 2, stderr
        assert stderr == f"fxsurgery: error: {message}\n", stderr
        assert "Traceback" not in stderr and stdout == ""
        assert_nothing_written(tmp, case, out)


def test_the_corpus_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.process for c in CASES) <= 5
    used = {a.split("/")[-1] for c in CASES for a in c.argv if a.startswith("{R}/")}
    unused = sorted(p.name for p in RULES.glob("*.yaml") if p.name not in used)
    assert unused == [], f"corpus files no case uses: {unused}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, scratch):
    check_case(case, tmp_path, scratch)


# -- Python rules: the message names the rule and the line that built it ---------------------------

def _origin(line: int) -> str:
    path = os.path.abspath(__file__)
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{line}"


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno


def test_python_rule_matching_nothing(resnet18):
    rule, line = Delete("fcc"), _line()
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet18, [rule], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert str(err.value) == (f"rule 1 'delete fcc' ({_origin(line)}) matched nothing: no module path or node name "
                              "matches 'fcc'; closest: fc; fix: correct the selector or add 'optional: true'")


def test_python_rule_that_does_not_fit(resnet18):
    rule, line = Replace("fc", fxs.new(nn.Linear, in_features=100, out_features=3)), _line()
    with pytest.raises(ValidateError) as err:
        fxs.apply(resnet18, [rule], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert str(err.value).startswith(f"rule 1 'replace fc with Linear(in_features=100, out_features=3)' ({_origin(line)}) at node 'fc'")


def test_python_spec_with_an_unknown_argument():
    with pytest.raises(RuleError) as err:
        fxs.new(nn.Linear, outfeatures=3)
    line = _line() - 1
    assert str(err.value) == (f"{_origin(line)}: torch.nn.Linear does not take 'outfeatures'; "
                              "fix: use its arguments (in_features, out_features, bias)")


def test_python_spec_with_a_value_the_class_rejects():
    # checked when the rule is built, as rule files are when loaded
    with pytest.raises(RuleError) as err:
        Insert(fxs.new(nn.Dropout, p=2.0), after="avgpool")
    line = _line() - 1
    assert str(err.value).startswith(f"{_origin(line)}: ") and FIX.search(str(err.value))


def test_python_insert_without_anchor():
    with pytest.raises(RuleError) as err:
        Insert(nn.Dropout(0.2))
    line = _line() - 1
    assert str(err.value) == f"{_origin(line)}: insert needs exactly one of after= or before=; fix: write insert(after='layer3') or before="


def test_python_detach_of_an_int():
    model = _models().Sized()
    rule, line = Detach(after="size"), _line()
    with pytest.raises(RewriteError) as err:
        fxs.apply(model, [rule], example_inputs=(torch.randn(2, 4),))
    assert str(err.value) == (f"rule 1 'detach after size' ({_origin(line)}) at 'size': value 'size' has type int, not Tensor; "
                              "only tensors carry gradients; fix: detach a node whose value is a tensor")


def test_python_freeze_without_parameters_warns(resnet18):
    rule, line = Freeze("relu"), _line()
    with pytest.warns(fxs.SurgeryWarning) as record:
        fxs.apply(resnet18, [rule], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert [str(w.message) for w in record] == [f"rule 1 'freeze relu' ({_origin(line)}): relu has no parameters; nothing to freeze"]


def test_python_selector_of_the_wrong_kind():
    with pytest.raises(RuleError) as err:
        Delete(3)
    line = _line() - 1
    assert str(err.value) == (f"{_origin(line)}: cannot select by 3 (int); fix: use a path glob, 're:REGEX', 'method:NAME', "
                              "a Module class or a function")


# -- usage errors: argparse's own, same contract --------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["apply", RESNET],                              # no rule file
    ["apply", RESNET, "r.yaml", "--input", "-1x3"],  # a value that looks like an option
    ["frobnicate"],                                 # no such command
], ids=["missing rules", "option-like value", "unknown command"])
def test_usage_error_is_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_module.main(argv)
        except SystemExit as exc:  # argparse exits by itself
            code = exc.code
    stderr = err.getvalue()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("fxsurgery: error: "), stderr
    assert "Traceback" not in stderr and os.listdir(tmp_path) == []


def test_python_trace_of_an_unquotable_name():
    with pytest.raises(TraceError) as err:
        trace(_models().Quoted())
    assert str(err.value) == ("module path 'fc\"2' contains a quote, backslash or line break, which torch.fx would write "
                              "into generated code unescaped; fix: rename that submodule")


@pytest.mark.parametrize("weights, problem", [
    ("DIR", "{w}: a directory, not a weights file or a torch.distributed.checkpoint directory; fix: pass the weights file in it "
            "(its .safetensors, or its *.index.json), or load a saved output as the MODEL"),
    ("/dev/zero", "{w}: not a regular file; fix: pass a .safetensors file"),
    ("TEXT", "{w}: neither a .safetensors file nor a torch checkpoint (zip or pickle); fix: pass the model's weights "
             "(.safetensors, or a weights-only .pt)"),
])
def test_weights_that_are_no_weights_file_say_what_they_are(tmp_path, weights, problem):
    """A saved output and /dev/zero said "no such weights file"; a text file "refused: IndexError"."""
    w = {"DIR": str(tmp_path), "TEXT": str(tmp_path / "notes.txt")}.get(weights, weights)
    (tmp_path / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, stdout, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "drop-dropout", "--weights", w, "--quiet"])
    assert (code, stdout, stderr) == (2, "", f"fxsurgery: error: {problem.format(w=w)}\n"), raised


def test_the_current_directory_is_no_output_to_replace(tmp_path, monkeypatch):
    """-o . --force said "cannot write: Device or resource busy; fix: choose a writable output directory"."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "drop-dropout", "--input", "1x3x32x32",
                                            "-o", ".", "--force", "--quiet"])
    assert (code, stderr) == (2, "fxsurgery: error: .: is the current directory, which an output replaces whole; fix: run from "
                                 "its parent, or name another output directory\n"), raised


@pytest.mark.parametrize("output, why", [("mine/new/..", "ends in '..', which names the directory above"),
                                         ("mine/new/../out", "passes '..' after a directory that does not exist")])
def test_an_output_path_through_dot_dot_is_refused_before_any_work(tmp_path, monkeypatch, output, why):
    """-o mine/new/.. ran the surgery, failed at the rename with "Device or resource busy" and left mine/new/ behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    code, stdout, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "drop-dropout", "--input", "1x3x32x32",
                                            "-o", output, "--quiet"])
    assert (code, stderr) == (2, f"fxsurgery: error: {output}: {why}; fix: name the output directory itself, without '..'\n"), raised
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["mine", "mine/notes.txt"]
