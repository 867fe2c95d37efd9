"""Built-in patterns: the rewrites people write by hand, with their maths.

Each is a `Pattern` usable from Python (`Rewrite(FoldBatchNorm())`) and from
rule files by name (`- rewrite: fold_bn`), its params as keys of the rule.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._util import SAME_IN_BOTH_MODES
from . import _policies as policies
from ._pattern import Pattern, element_text

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
            F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
RELUS = (nn.ReLU, F.relu, torch.relu, "method:relu")


def folded(weight, bias, mean, var, gamma, beta, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') in float64 for a layer (weight, bias) followed by an eval-mode BatchNorm:
    s = γ/σ, σ = sqrt(var + eps), W' = W·s per output channel, b' = (b − μ)·s + β.
    One function for the rewrite and for map-weights' replay, so both give the same bits."""
    sigma = torch.sqrt(var.double() + eps)
    gamma = gamma.double() if gamma is not None else torch.ones_like(sigma)
    beta = beta.double() if beta is not None else torch.zeros_like(sigma)
    s = gamma / sigma
    t = beta - mean.double() * s
    b = bias.double() if bias is not None else torch.zeros_like(s)
    return weight.double() * s.reshape(-1, *([1] * (weight.dim() - 1))), b * s + t


def _fold_recipe(layer: nn.Module, bn: nn.Module) -> dict:
    """How map-weights recomputes a fold from a checkpoint: which tensors it reads (module index, name)."""
    reads = {"weight": (0, "weight"), "mean": (1, "running_mean"), "var": (1, "running_var")}
    reads.update({role: where for role, where, t in (("bias", (0, "bias"), layer.bias), ("gamma", (1, "weight"), bn.weight),
                                                      ("beta", (1, "bias"), bn.bias)) if t is not None})
    return {part: {"op": "fold", "part": part, "eps": float(bn.eps), "reads": reads} for part in ("weight", "bias")}


def replay(recipe: dict, read, dst: torch.Tensor) -> None:
    """Fill `dst` as a rewrite or weights policy filled it, from tensors `read(name)` of a checkpoint.

    `recipe` is what the transfer report recorded (report.recipes): a weights
    policy ({"op": "policy"}) or a built-in fold ({"op": "fold"}).
    """
    tensors = {role: read(name) for role, name in recipe["reads"].items()}
    if recipe["op"] == "policy":
        policy = recipe["policy"]
        if isinstance(policy, dict) and "kept" in policy:  # a pruned tensor: the indices kept along each axis
            policy = policies.Kept({"": {int(axis): tuple(kept) for axis, kept in policy["kept"].items()}})
        elif isinstance(policy, dict):
            policy = {"select": tuple(policy["select"])}
        policies.carry(policy, tensors["src"], dst)
        return
    weight, bias = folded(tensors["weight"], tensors.get("bias"), tensors["mean"], tensors["var"], tensors.get("gamma"),
                          tensors.get("beta"), recipe["eps"])
    dst.copy_(weight if recipe["part"] == "weight" else bias)


def own_forward(module: nn.Module, *bases: type) -> str | None:
    """Why a module matched by its type may not compute what its torch base class does: a forward of its own.

    A leaf subclass (timm's BatchNormAct2d, which adds an activation; StdConv2d, which
    standardises its weight) would otherwise be folded as the plain layer, dropping what it adds."""
    base = next((b for b in bases if isinstance(module, b)), None)
    # a convolution's forward calls _conv_forward, which a subclass may override instead (a reparametrised weight)
    if base is None or all(getattr(type(module), m) is getattr(base, m) for m in ("forward", "_conv_forward") if hasattr(base, m)):
        return None
    return f"{type(module).__name__} has a forward of its own, not {base.__name__}'s: rewriting it as one would lose what it adds"


def _bn_problem(bn: nn.Module, out: int) -> str | None:
    if bn.training:
        return (f"{type(bn).__name__} is in training mode, where it normalises with batch statistics: "
                "call .eval() on the model before folding")
    if bn.running_mean is None:
        return f"{type(bn).__name__} keeps no running statistics (track_running_stats=False), so it is not an affine map"
    if bn.num_features != out:
        return f"{type(bn).__name__} has {bn.num_features} features, the layer before it {out}"
    return None


class FoldBatchNorm(Pattern):
    """Fold an eval-mode BatchNorm into the convolution before it.

    bn(conv(x)) = s·(W∗x + b) + t with s = γ/σ, σ = sqrt(var + eps), t = β − μ·s, so
        W' = W · s  (per output channel)      b' = (b − μ)·γ/σ + β  (b = 0 without bias)
    Conv1d/2d/3d, any groups, dilation and padding. Computed in float64, stored
    in the convolution's dtype. The result equals the original in eval mode.
    """

    pattern = (CONVS, NORMS)

    def leaves(self, model):
        # timm's BatchNormAct2d (batchnorm, dropout, activation) is traced into F.batch_norm, which no module
        # pattern matches: called as one module, it folds as its batchnorm, its dropout and activation kept
        return [path for path, m in model.named_modules() if _norm_act(m) and not m.training]

    def check(self, conv, bn):
        return own_forward(conv, *CONVS) or (None if _norm_act(bn) else own_forward(bn, *NORMS)) or _bn_problem(bn, conv.out_channels)

    def rewrite(self, conv, bn):
        fused = self._fused(conv, bn)
        return nn.Sequential(fused, bn.drop, bn.act) if _norm_act(bn) else fused

    def _fused(self, conv, bn):
        fused = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                           padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            weight, bias = folded(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
        return fused

    def recipe(self, conv, bn):
        made = _fold_recipe(conv, bn)
        return {f"0.{k}": v for k, v in made.items()} if _norm_act(bn) else made

    def describe(self):
        return "fold_bn (conv + batchnorm -> conv)"


def _norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d, whose forward is act(drop(batch_norm(x))) (a subclass may add to it: not that)."""
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.") and isinstance(module, nn.BatchNorm2d) \
        and isinstance(getattr(module, "drop", None), nn.Module) and isinstance(getattr(module, "act", None), nn.Module)


class FoldLinearBatchNorm(Pattern):
    """Fold an eval-mode BatchNorm1d into the Linear before it.

    bn(Wx + b) = s·(Wx + b) + t:   W' = diag(s)·W,   b' = (b − μ)·γ/σ + β.
    """

    pattern = (nn.Linear, nn.BatchNorm1d)

    def check(self, linear, bn):
        return own_forward(linear, nn.Linear) or own_forward(bn, nn.BatchNorm1d) or _bn_problem(bn, linear.out_features)

    def check_shapes(self, linear_out, bn_out):
        if linear_out is not None and len(linear_out) != 2:
            return (f"the Linear's output has {len(linear_out)} dimensions: BatchNorm1d then normalises dimension 1, "
                    "not the Linear's features")
        return None

    def rewrite(self, linear, bn):
        fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            weight, bias = folded(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
        return fused

    def recipe(self, linear, bn):
        return _fold_recipe(linear, bn)

    def describe(self):
        return "fold_linear_bn (linear + batchnorm1d -> linear)"


def _attention_without_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as called, less its dropout (timm's and transformers' attention pass
    `dropout_p=self.p if self.training else 0.`: no dropout module or call to match)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _mha_without_dropout(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                         add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                         need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                         v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True, is_causal=False):
    """multi_head_attention_forward as called, less its dropout (an nn.MultiheadAttention traced as the model)."""
    return F.multi_head_attention_forward(
        query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn, 0.0,
        out_proj_weight, out_proj_bias, training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
        k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
        average_attn_weights=average_attn_weights, is_causal=is_causal)


# torch.nn modules that torch.fx calls as one module (leaves) while they drop inside: their Dropout children
# and nn.MultiheadAttention's `dropout` are out of the graph's reach, so the leaf itself is matched
CARRIERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
            nn.TransformerDecoder, nn.Transformer)


def _drops(module: nn.Module) -> list[str]:
    """Where a module drops inside: its dropout children with p > 0 and attentions with dropout > 0."""
    return [path or type(module).__name__ for path, sub in module.named_modules()
            if isinstance(sub, DROPOUTS[:6]) and sub.p > 0 or isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0]


def _without_dropout(module: nn.Module) -> nn.Module:
    """A copy of a module's structure with each dropout's p and each attention's dropout 0 (F.dropout returns its
    input as it is then; code that reads `.p` still finds it), holding the original's tensors and the children
    that do not drop (transferred as they are). Its dicts are copied, so the original is never changed."""
    if not _drops(module):
        return module
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set)):  # _parameters, _buffers, _modules, the hook tables
            setattr(new, key, copy.copy(value))
    for name, child in module.named_children():
        new._modules[name] = _without_dropout(child)
    if isinstance(new, nn.MultiheadAttention):
        new.dropout = 0.0
    if isinstance(new, DROPOUTS[:6]):
        new.p = 0.0
    return new


def _dropout_p(node: fx.Node):
    return node.kwargs["dropout_p"] if "dropout_p" in node.kwargs else (node.args[4] if len(node.args) > 4 else 0.0)


class DropDropout(Pattern):
    """Remove dropout, modules and functions: dropout(x) -> x (exact in eval mode), and the dropout
    of scaled_dot_product_attention calls (dropout_p -> 0)."""

    pattern = ((*DROPOUTS, F.scaled_dot_product_attention, F.multi_head_attention_forward, *CARRIERS),)
    weights = "new"  # it computes no tensor: a carrier's copy holds the original's, transferred

    def check(self, dropout):  # a dropout that always drops (Monte Carlo dropout) is not the identity in eval mode
        if isinstance(dropout, fx.Node) and dropout.target is F.scaled_dot_product_attention:
            # the same constant 0 in both modes: nothing to remove (a mode-dependent one is matched in both graphs)
            p = _dropout_p(dropout)
            if p in (0, 0.0) and dropout.meta.get(SAME_IN_BOTH_MODES, True):
                return "scaled_dot_product_attention is called without dropout"
            if isinstance(p, (int, float)) and dropout.meta.get(SAME_IN_BOTH_MODES):  # as F.dropout(x) below
                return f"scaled_dot_product_attention is called with dropout_p={p} in both modes, so it drops in eval mode too"
            return None
        if isinstance(dropout, fx.Node):
            try:
                bound = inspect.signature(dropout.target).bind(*dropout.args, **dropout.kwargs)
            except (TypeError, ValueError):
                return None
            bound.apply_defaults()
            if dropout.target is F.multi_head_attention_forward and bound.arguments["dropout_p"] in (0, 0.0):
                return "multi_head_attention_forward is called without dropout"
            # training=True from self.training in a train-mode capture follows the mode (capture/_modes.py marks which do not)
            if bound.arguments.get("training") is True and dropout.meta.get(SAME_IN_BOTH_MODES):
                return f"{dropout.target.__name__} is called with training=True (F.dropout's default), so it drops in eval mode too"
            return None
        if isinstance(dropout, CARRIERS):
            inner = [own_forward(sub, *DROPOUTS[:6]) for sub in dropout.modules() if isinstance(sub, DROPOUTS[:6])]
            return (own_forward(dropout, *CARRIERS) or next((f"inside it, {why}" for why in inner if why), None)
                    or (None if _drops(dropout) else f"{type(dropout).__name__} does not drop"))
        return own_forward(dropout, *(d for d in DROPOUTS if isinstance(d, type)))

    def rewrite(self, dropout):
        if isinstance(dropout, fx.Node) and dropout.target is F.scaled_dot_product_attention:
            return _attention_without_dropout
        if isinstance(dropout, fx.Node) and dropout.target is F.multi_head_attention_forward:
            return _mha_without_dropout
        if isinstance(dropout, CARRIERS):
            return _without_dropout(dropout)
        return None

    def describe(self):
        return "drop_dropout"


_FUNCTIONAL = {nn.GELU: F.gelu, nn.SiLU: F.silu, nn.ReLU: F.relu, nn.Mish: F.mish, nn.Hardswish: F.hardswish,
               nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.ELU: F.elu, nn.LeakyReLU: F.leaky_relu}


class SwapActivation(Pattern):
    """Swap an activation in every form: modules become `to()`, function and method
    calls become its functional form (`nn.GELU` -> `F.gelu`). Weights: none.
    A module called at several places is swapped once, for all of them."""

    weights = "new"

    def __init__(self, to=nn.GELU, of=RELUS):
        if not (isinstance(to, type) and issubclass(to, nn.Module)):
            raise ValueError(f"to= must be a Module class, got {to!r}")
        self.to = to
        self.pattern = (tuple(of) if isinstance(of, (list, tuple)) else (of,),)

    def rewrite(self, activation):
        if isinstance(activation, nn.Module):
            return self.to()
        return _FUNCTIONAL.get(self.to, self.to())

    def describe(self):
        return f"swap_activation {element_text(self.pattern[0])} -> {self.to.__name__}"


class LoRA(nn.Module):
    """y = base(x) + B(A(x)) · alpha / rank: a low-rank update beside a frozen Linear.

    A starts as Kaiming-uniform (as in LoRA), B as zeros, so y = base(x) at insertion.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


class AddLoRA(Pattern):
    """Low-rank adapters on Linear layers (select them by path: `select: 're:.*(q|v)_proj'`).

    Each becomes y = W x + b + (alpha/rank) · B A x with A: [rank, in], B: [out, rank];
    B = 0 so outputs are unchanged at insertion; the base weights are frozen and
    keep their paths; A and B are new, at `<path>_lora.lora_a` / `.lora_b`.
    """

    weights = "new"
    freeze_matched = True
    pattern = (nn.Linear,)
    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 16.0):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")  # nan or inf times B = 0 is nan
        self.rank, self.alpha = rank, float(alpha)

    def rewrite(self, linear):
        side = max(linear.in_features, linear.out_features)  # a rank of 10^9 would not fit in memory
        if self.rank > side:
            raise ValueError(f"rank {self.rank} is above {side}, the larger side of Linear({linear.in_features}, "
                             f"{linear.out_features}): the adapter would outgrow the layer")
        return LoRA(linear, self.rank, self.alpha)

    def describe(self):
        return f"lora (rank {self.rank}, alpha {self.alpha:g})"


class AdaptInputChannels(Pattern):
    """The first convolution in graph order takes `in_channels` inputs.

    Its filters are adapted as timm does: 3 -> 1 sums them over the input
    channels (W' = Σ_c W[:, c]), 3 -> N repeats them and scales by 3/N, so a
    grey image gives the output its RGB replica gave. The model's input
    changes shape with it (reported).
    """

    pattern = ((*CONVS, F.conv1d, F.conv2d, F.conv3d),)  # one traced through counts: it may be the first
    first_only = True

    def __init__(self, in_channels: int = 1):
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.in_channels = in_channels

    def check(self, conv):
        if isinstance(conv, fx.Node):  # a module computing the filters it convolves with (timm's StdConv2d), traced through
            where = list((conv.meta.get("nn_module_stack") or {"": ("the model",)}).values())[-1][0]
            return (f"the first convolution is {conv.target.__name__} in '{where}', whose module computes its filters: "
                    f"Replace '{where}' by hand with a layer of {self.in_channels} input channels")
        if own_forward(conv, *CONVS):
            return own_forward(conv, *CONVS)
        if conv.groups != 1:
            return f"the first convolution is grouped ({conv.groups} groups)"
        return None

    def rewrite(self, conv):
        new = type(conv)(self.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            policies.adapt_input_channels(conv.weight, new.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new

    def recipe(self, conv):
        out = {"weight": {"op": "policy", "policy": "adapt_input_channels", "reads": {"src": (0, "weight")}}}
        if conv.bias is not None:
            out["bias"] = {"op": "policy", "policy": "keep", "reads": {"src": (0, "bias")}}
        return out

    def describe(self):
        return f"adapt_input_channels -> {self.in_channels}"


BUILTINS = {"fold_bn": FoldBatchNorm, "fold_linear_bn": FoldLinearBatchNorm, "drop_dropout": DropDropout,
            "swap_activation": SwapActivation, "lora": AddLoRA, "adapt_input_channels": AdaptInputChannels}
