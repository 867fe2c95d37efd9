"""Freeze rules act on the assembled module; train/eval modes follow the original."""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture import other_graph, recompile
from ..rewrite import Rewritten, mode_at, stay_eval, stays_eval
from ..spec import Freeze, Prune, frozen_by, statistics


def _is_container(module: nn.Module) -> bool:
    return type(module) is nn.Module or isinstance(module, fx.GraphModule)


def _warn_moving_norms(rewritten: Rewritten, m, frozen: list[str], originals: dict) -> None:
    """Frozen weights whose BatchNorm statistics still move under .train(): what users of a frozen backbone
    rarely mean, and the reason Freeze has bn="eval"."""
    norms = sorted({n.rpartition(".")[0] for n in frozen if isinstance(bn := originals.get(n.rpartition(".")[0]), _BatchNorm)
                    and bn.track_running_stats})  # without running statistics there are none to move
    if norms:
        shown = ", ".join(norms[:2]) + (f" and {len(norms) - 2} more" if len(norms) > 2 else "")
        rewritten.plan.warnings.append(
            f"{m.label} freezes {len(norms)} BatchNorm layer{'s' if len(norms) > 1 else ''} ({shown}), whose running statistics "
            "still move under model.train(); fix: bn='eval' (bn: eval in a rule file) holds them, unless they should adapt")


def _warn_tied(rewritten: Rewritten, m, frozen: list[str], params: dict, chosen: set[str]) -> None:
    """A parameter no Freeze selects that is one tensor with one this rule freezes (tied embeddings: lm_head.weight
    and embed_tokens.weight) is frozen too: a head excluded from a frozen backbone trained nothing, silently.
    `chosen`: what every Freeze selects (freezing both names knowingly is no surprise)."""
    partner = {id(params[n]): n for n in frozen if n in params}
    tied = [(n, partner[id(p)]) for n, p in params.items() if n not in chosen and id(p) in partner]
    if tied:
        name, other = tied[0]
        rewritten.plan.warnings.append(
            f"{m.label} freezes {other}, which {name} is tied to (one tensor): {name} is frozen too; fix: untie them "
            f"(config.tie_word_embeddings=False for transformers) to train {name} alone, or freeze both knowingly")


def freeze(rewritten: Rewritten, module: nn.Module, rule_of, modules: dict | None = None,
           originals: dict | None = None, copies=frozenset()) -> None:
    """Each Freeze rule acts on the new module's parameters, except those a later rule made.

    `modules`, `originals`: the new module's and the original's named_modules, where the caller has them;
    `copies`: ids of the original's tensors' copies: a module a later rule made around them (drop_dropout's
    copy of an nn.TransformerEncoder) passes them on as they were, frozen by an earlier Freeze too."""
    originals = dict(rewritten.capture.model.named_modules()) if originals is None else originals
    modules = dict(module.named_modules()) if modules is None else modules

    def type_of(path):
        here = modules.get(path)
        if here is None or _is_container(here):
            return type(originals[path]) if path in originals else type(here)
        return type(here)

    params = dict(module.named_parameters(remove_duplicate=False))
    stats = statistics(modules)  # BatchNorms without parameters (affine=False): bn="eval" holds them too
    others = _other_names(rewritten.capture.model)
    # Prune leaves a layer where it was, narrower: a Freeze before it still holds it (Replace makes a layer to train)
    pruned = {m.index for m in rewritten.plan.matches if isinstance(m.rule, Prune)}
    selected = {m.index: frozen_by(m.rule, [*params, *stats], type_of, others)[0] for m in rewritten.plan.matches
                if isinstance(m.rule, Freeze)}
    chosen = set().union(*selected.values())
    for m in rewritten.plan.matches:
        if isinstance(m.rule, Freeze):
            frozen = selected[m.index]
            if m.rule.bn != "eval":
                _warn_moving_norms(rewritten, m, frozen, originals)
            _warn_tied(rewritten, m, frozen, params, chosen)
            for name in frozen:
                maker = None if name in params and id(params[name]) in copies else rule_of(name)
                if maker is None or maker < m.index or maker in pruned:
                    if name in params:
                        params[name].requires_grad_(False)
                        params[name].grad = None
                    owner = modules.get(name.rpartition(".")[0])
                    if m.rule.bn == "eval" and isinstance(owner, _BatchNorm) and not stays_eval(owner):
                        owner.register_forward_pre_hook(stay_eval)
                        owner.training = False


def freeze_derived(rewritten: Rewritten, derived: list[tuple], originals: dict) -> None:
    """A tensor a pattern computed from modules earlier Freeze rules froze, or the model came frozen, is frozen
    too (`freeze *` then fold-bn: the folded convolution stays frozen, as the two it came from were). One computed from frozen and
    trainable modules alike trains, and a warning says so."""
    if not derived:
        return
    freezes = [m for m in rewritten.plan.matches if isinstance(m.rule, Freeze)]
    model = rewritten.capture.model
    names = [n for n, _ in model.named_parameters()]
    others = _other_names(model)
    frozen_at = {m.index: set(frozen_by(m.rule, names, lambda p: type(originals.get(p)), others)[0]) for m in freezes}
    given = {n for n, p in model.named_parameters() if not p.requires_grad}  # frozen before the surgery (a result chained on)
    for path, made, sources, rule, computed in derived:
        prefixes = tuple(s + "." for s in sources)
        inputs = [n for n in names if n.startswith(prefixes)]
        before = given.union(*(done for i, done in frozen_at.items() if i < rule))
        frozen = [n for n in inputs if n in before]
        training = [p for n, p in made.named_parameters() if p.requires_grad and (computed is None or n in computed)]
        if not frozen or not training:
            continue
        if len(frozen) == len(inputs):
            for p in training:
                p.requires_grad_(False)
        else:
            thawed = next(n for n in inputs if n not in before)
            rewritten.plan.warnings.append(
                f"{rewritten.rule_of(rule).label} computed {path} from {', '.join(sources)}, of which {frozen[0]} is frozen "
                f"and {thawed} is not: {path} trains; fix: freeze all of {', '.join(sources)}, or put a Freeze of {path} "
                "after this rule")


def _other_names(model: nn.Module):
    """name -> the same parameter's names under a module's other paths in the original (`self.b = self.a`):
    a graph calls such a module by one path, and a Freeze naming another must still reach it."""
    paths: dict[int, list[str]] = {}
    for path, sub in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(sub), []).append(path)
    aliases = {p: [q for q in group if q != p] for group in paths.values() if len(group) > 1 for p in group}
    if not aliases:
        return None

    def others(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join([alias, *parts[i:]]) if alias else ".".join(parts[i:])
                for i in range(len(parts) - 1, 0, -1) for alias in aliases.get(".".join(parts[:i]), ())]
    return others


def follow_modes(module: nn.Module, model: nn.Module, modules: dict | None = None, originals: dict | None = None,
                 made: dict[int, int] | None = None) -> None:
    """Containers the assembly made take the original's train/eval mode; real modules keep theirs, except
    those a rule made (`made`: ids), which take the mode of the original where they sit (a Dropout a pattern
    made in train mode would drop in a model that says eval)."""
    originals = dict(model.named_modules()) if originals is None else originals
    seen: set[int] = set()
    for path, sub in (module.named_modules() if modules is None else modules.items()):
        if id(sub) in seen:  # a module at two paths takes the mode of the first, as named_modules lists it
            continue
        seen.add(id(sub))
        if _is_container(sub):
            sub.training = originals[path].training if path in originals else model.training
        elif made and id(sub) in made:
            sub.train(mode_at(model, path))
            for inner in sub.modules():  # Freeze(..., bn="eval") ran before: those stay in eval mode
                inner.training = inner.training and not stays_eval(inner)




def hold_norms(module: nn.Module, rewritten: Rewritten) -> int:
    """F.batch_norm calls over the tensors of a BatchNorm that Freeze(bn="eval") holds, in every graph and both
    modes: they normalise with the running statistics (training=False) and count no batches. A module's hook
    cannot do it where the graph traced into the BatchNorm's forward (timm's BatchNormAct2d): nothing calls it."""
    model = rewritten.capture.model
    originals = dict(model.named_modules())
    names = [n for n, _ in model.named_parameters()] + statistics(originals)
    held = {name.rpartition(".")[0] for m in rewritten.plan.matches if isinstance(m.rule, Freeze) and m.rule.bn == "eval"
            for name in frozen_by(m.rule, names, lambda p: type(originals.get(p)), _other_names(model))[0]}
    held = {p for p in held if isinstance(originals.get(p), _BatchNorm)}
    edited = 0
    for prefix, gm in (module.named_modules() if held else ()):
        if isinstance(gm, fx.GraphModule):
            other = other_graph(gm)
            here = sum(_hold(graph, held, prefix) for graph in [gm.graph] + ([other[0]] if other else []))
            if here:
                recompile(gm)
            edited += here
    return edited


def _holds(node, held: set[str], prefix: str) -> bool:
    """`node` is a get_attr of a tensor of a BatchNorm held in eval mode."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    owner = node.target.rpartition(".")[0]
    return (f"{prefix}.{owner}" if prefix else owner) in held


def _hold(graph: fx.Graph, held: set[str], prefix: str) -> int:
    edited = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.batch_norm:
            stats = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
            if not _holds(stats, held, prefix):
                continue
            if len(node.args) > 5:
                node.args = (*node.args[:5], False, *node.args[6:])
            else:
                node.kwargs = {**node.kwargs, "training": False}
            edited += 1
        elif (node.op == "call_method" and node.target in ("add_", "__iadd__") and not node.users and node.args
              and isinstance(node.args[0], fx.Node) and str(node.args[0].target).endswith("num_batches_tracked")
              and _holds(node.args[0], held, prefix)):
            graph.erase_node(node)  # the count of batches a held BatchNorm never sees (its read stays: saves keep it)
            edited += 1
    return edited
