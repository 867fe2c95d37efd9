"""What a dependency group is: the tensor axes that lose channels together, and the refusal when none can."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

Index = tuple  # group channel i -> tuple of positions along one axis

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm,)
# f(0) = 0 and each channel on its own: a zeroed channel stays zero through these
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Hardtanh,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Softshrink, nn.Hardshrink,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d)
# by name, so that match never imports torchvision: drops whole samples (or nothing, in eval), never a channel
_ZERO_BY_NAME = ("StochasticDepth",)
_ZERO_NAMES = {"relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "mish", "leaky_relu", "elu",
               "tanh", "hardtanh", "hardtanh_", "dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous", "clone",
               "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "interpolate", "stochastic_depth",
               "float", "to", "type_as", "detach"}
_ADD = {"add", "add_", "iadd", "sub", "sub_", "isub"}
_MUL = {"mul", "mul_", "imul"}
_SIZE = {"size", "dim", "numel"}
# a gate's activation (by type or function name): its values scale channels, and need not be zero
GATES = ("Sigmoid", "Hardsigmoid", "HardSigmoid", "sigmoid", "hardsigmoid", "hard_sigmoid")


def _shift(index: Index, off: int, width: int) -> Index:
    """Positions of a whole seen from the piece [off, off + width) of it."""
    return tuple(tuple(x - off for x in ix if off <= x < off + width) for ix in index)


def _grow(index: Index, k: int) -> Index:
    """Each position becomes k consecutive ones (a flatten, a depthwise multiplier)."""
    return tuple(tuple(p * k + t for p in ix for t in range(k)) for ix in index)


class Unprunable(Exception):
    """A group reaches something whose channels cannot be removed exactly."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"node '{node}': {reason}")
        self.node, self.reason = node, reason


@dataclass(frozen=True)
class Slice:
    """One tensor axis a group cuts: `target` (a module, or a tensor read by get_attr) and `param` of it."""

    target: str
    param: str            # '' for a get_attr tensor
    axis: int
    index: Index
    source: bool          # the channel is produced here (zeroing it here zeros the channel); else it is read


@dataclass
class Group:
    """The channels of one layer's output and every tensor axis coupled to them."""

    width: int
    start: str                                         # the node the group was computed from
    slices: dict = field(default_factory=dict)         # (target, param, axis) -> Slice
    members: dict = field(default_factory=dict)        # node name -> (dim, index)
    splits: dict = field(default_factory=dict)         # split/chunk node -> dim: its piece sizes follow

    @property
    def key(self) -> frozenset:
        return frozenset((k, s.index) for k, s in self.slices.items())

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.target for s in self.slices.values()))

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(s.target for s in self.slices.values() if s.source))

    def removed(self, channels) -> dict[tuple, set]:
        """(target, param, axis) -> positions removed there when group channels `channels` go."""
        out: dict[tuple, set] = {}
        for key, s in self.slices.items():
            out[key] = {p for c in channels for p in s.index[c]}
        return out


