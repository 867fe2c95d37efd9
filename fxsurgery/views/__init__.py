"""Views for people: what a model is made of, and what a surgery changed.

`overview` lists a captured model's modules, nodes, shapes and what traced
(`fxsurgery inspect`); `dependency_groups`, the layers that lose channels together
(`fxsurgery inspect --groups`); `diff` draws the graph before and after a surgery as a
self-contained HTML page or an SVG (`fxsurgery diff`).
"""

from ._groups import dependency_groups, groups_table
from ._inspect import overview, overview_table
from ._page import check_free, check_suffix, diff

__all__ = [
    "check_free", "check_suffix", "dependency_groups", "diff", "groups_table", "overview", "overview_table",
]
