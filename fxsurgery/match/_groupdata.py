"""What a dependency group is: the tensor axes that lose channels together, and the refusal when none can."""

from __future__ import annotations

from dataclasses import dataclass, field

Index = tuple  # group channel i -> tuple of positions along one axis


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


