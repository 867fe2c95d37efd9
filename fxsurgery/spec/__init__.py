"""Rules as data: what the user writes, checked when it is loaded, never a graph.

Selectors (globs, `re:`, module types, functions, `method:NAME`), the rule
kinds (Delete, Replace, Insert, Detach, Freeze, Layers, Output, Rewrite, Prune), `fxs.new`
specs with their weight policies, pattern rules and the built-in patterns,
and YAML rule files (`load_rules`). Every rule remembers the file and line, or
the Python line, it came from.
"""

from ._builtins import AdaptInputChannels, AddLoRA, DropDropout, FoldBatchNorm, FoldLinearBatchNorm, SwapActivation, replay
from ._load import load_rule_files, load_rules, parse_overrides, rule_path, shipped_rules
from ._new import New, like, new, planning, refuse_valueless
from ._pattern import Chain, Output, Pattern, Rewrite, calls, dag_graph, element_text, pattern
from ._policies import Kept, carry, ranges
from ._prune import Prune
from ._rules import Delete, Detach, Freeze, Insert, Layers, Replace, Rule, RuleSet, describe, flatten, fresh, frozen_by, statistics
from ._selector import Selector

__all__ = [
    "AdaptInputChannels", "AddLoRA", "Chain", "Delete", "Detach", "DropDropout", "FoldBatchNorm",
    "FoldLinearBatchNorm", "Freeze", "Insert", "Kept", "Layers", "New", "Output", "Pattern", "Prune", "Replace", "Rewrite", "Rule",
    "RuleSet", "Selector", "SwapActivation", "calls", "carry", "dag_graph", "describe", "element_text",
    "flatten", "fresh", "frozen_by", "like", "load_rule_files", "load_rules", "new", "parse_overrides", "pattern", "rule_path",
    "planning", "shipped_rules", "ranges", "refuse_valueless", "replay", "statistics",
]
