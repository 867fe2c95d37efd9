"""Draw the before/after diff as one standalone SVG, laid out without graphviz.

Rows are networkx topological generations, so parallel branches (a ResNet's
downsample path) sit side by side. Module groups are nested frames; the gap
between two rows grows by the frame edges that open or close between them, so
a frame never covers a row it does not hold. An edge to the next row is a
short line; a longer one (a residual connection) bends out to the right.

The sides come from `fxsurgery.diff.sides`; this module only draws them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from html import escape

import networkx as nx

BOX_W, BOX_H = 240, 30        # a node
COL_GAP, ROW_GAP = 28, 12
HEAD, FOOT, PAD = 18, 6, 8    # a group frame: label strip, bottom and side margins
BEND = 44                     # how far a long edge bends out to the right of the boxes
LINK = BOX_W - 24             # where a short edge meets a box: clear of the frame labels on the left
CHAR = 6.6                    # width of one monospace character at 11px
LINE = 15
TOP = 44                      # below the title

_STYLE = (".h{font-size:14px;font-weight:700;fill:#1f2328}.n{font-size:11px;font-weight:600;fill:#1f2328}"
          ".t{font-size:10px;fill:#57606a}.g{font-size:10px;font-weight:600}.x{font-size:11px;fill:#1f2328}")


def esc(value) -> str:
    return escape(str(value), quote=True)


def fit(text: str, width: float, char: float = CHAR) -> str:
    """`text` cut to `width` pixels, with an ellipsis where it was cut."""
    most = max(int(width // char), 4)
    return text if len(text) <= most else text[:most - 1] + "\u2026"


def rows_of(side) -> list[list]:
    """The side's nodes in rows: topological generations, graph order within a row."""
    order = {item.name: i for i, item in enumerate(side.items)}
    graph = nx.DiGraph()
    graph.add_nodes_from(order)
    graph.add_edges_from((u, item.name) for item in side.items for u, _ in item.inputs if u in order)
    rank = {name: r for r, generation in enumerate(nx.topological_generations(graph)) for name in generation}
    for item in side.items:   # a constant is drawn just above its first reader, not at the top
        if item.op != "placeholder" and not graph.in_degree(item.name) and graph.out_degree(item.name):
            rank[item.name] = min(rank[s] for s in graph.successors(item.name)) - 1
    rows = defaultdict(list)
    for item in side.items:
        rows[rank[item.name]].append(item)
    return [rows[r] for r in sorted(rows)]


def place(rows: list[list], left: float, top: float) -> tuple[dict, dict, float]:
    """(node -> (x, y), node -> row, bottom): rows spaced for the frames that open and close between them."""
    first, last = {}, {}
    for r, row in enumerate(rows):
        for item in row:
            for key in item.chain:
                first.setdefault(key, r)
                last[key] = r
    opens, closes = Counter(first.values()), Counter(last.values())
    pos, row_of, y = {}, {}, top
    for r, row in enumerate(rows):
        y += HEAD * opens[r] + (FOOT * closes[r - 1] + ROW_GAP if r else 0)
        for c, item in enumerate(row):
            pos[item.name], row_of[item.name] = (left + c * (BOX_W + COL_GAP), y), r
        y += BOX_H
    return pos, row_of, y + FOOT * closes[len(rows) - 1]


def frames(group, pos: dict, out: list) -> tuple | None:
    """The box around a group's nodes and nested frames; every frame goes into `out`."""
    boxes = []
    for child in group.children:
        if hasattr(child, "children"):
            box = frames(child, pos, out)
        else:
            x, y = pos[child.name]
            box = (x, y, x + BOX_W, y + BOX_H)
        if box:
            boxes.append(box)
    if not boxes:
        return None
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    if not group.key:   # the root is the panel itself
        return box
    box = (box[0] - PAD, box[1] - HEAD, box[2] + PAD, box[3] + FOOT)
    out.append((group, box))
    return box


def _frame(group, box: tuple, side: str, colour: str) -> str:
    x0, y0, x1, y1 = box
    label = fit(f"{group.key} {group.kind}", x1 - x0 - 10, 6.5)
    return (f'<g class="fxs-group" data-side="{side}" data-module="{esc(group.path)}" data-key="{esc(group.key)}" '
            f'data-status="{group.status}"><rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" rx="6" '
            f'fill="{colour}" fill-opacity="0.05" stroke="{colour}" stroke-opacity="0.7"/>'
            f'<text class="g" x="{x0 + 6}" y="{y0 + 13}" fill="{colour}">{esc(label)}</text></g>')


def _box(item, x: float, y: float, side: str, colour: str) -> str:
    dash = ' stroke-dasharray="5 3"' if item.status == "cut" else ""
    strike = ' text-decoration="line-through"' if item.status == "deleted" else ""
    attrs = f' data-rule="{item.rule}"' if item.rule else ""
    attrs += f' data-module="{esc(item.target)}"' if item.target else ""
    tip = item.name + (f": {item.note}" if item.note else "")
    return (f'<g class="fxs-node" data-side="{side}" data-node="{esc(item.name)}" data-status="{item.status}"{attrs}>'
            f'<title>{esc(tip)}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{colour}" '
            f'fill-opacity="0.12" stroke="{colour}" stroke-width="1.5"{dash}/>'
            f'<text class="n" x="{x + 6}" y="{y + 12}"{strike}>{esc(fit(item.name, BOX_W - 12))}</text>'
            f'<text class="t" x="{x + 6}" y="{y + 25}">{esc(fit(f"{item.what}  {item.shape}", BOX_W - 12, 6.0))}</text></g>')


def _edge(u: str, v: str, cut: bool, pos: dict, row_of: dict, side: str, colour: str) -> str:
    (ux, uy), (vx, vy) = pos[u], pos[v]
    if row_of[v] == row_of[u] + 1:
        d = f"M{ux + LINK},{uy + BOX_H} L{vx + LINK},{vy}"
    else:
        a, b, ya, yb = ux + BOX_W, vx + BOX_W, uy + BOX_H / 2, vy + BOX_H / 2
        d = f"M{a},{ya} C{a + BEND},{ya} {b + BEND},{yb} {b},{yb}"
    look = f'stroke="{colour}" stroke-width="1.8" stroke-dasharray="5 3"' if cut else 'stroke="#8c959f" stroke-width="1.1"'
    return (f'<path class="fxs-edge" data-side="{side}" data-from="{esc(u)}" data-to="{esc(v)}" '
            f'data-status="{"cut" if cut else "kept"}" d="{d}" fill="none" {look} marker-end="url(#fxs-arrow)"/>')


def panel(side, left: float, colours: dict) -> tuple[str, float, float]:
    """(svg, width, bottom) of one side, drawn from x = `left`."""
    rows = rows_of(side)
    depth = max((len(item.chain) for item in side.items), default=0)
    pos, row_of, bottom = place(rows, left + PAD * depth, TOP + 28)
    boxes: list = []
    frames(side.root, pos, boxes)
    right = max([x + BOX_W for x, _ in pos.values()] + [b[2] for _, b in boxes] + [left]) + BEND
    parts = [f'<g class="fxs-side" data-side="{side.name}">',
             f'<text class="h" x="{left}" y="{TOP + 14}">{side.name}: {len(side.items)} nodes, {len(boxes)} module groups</text>']
    area = lambda b: (b[1][2] - b[1][0]) * (b[1][3] - b[1][1])
    parts += [_frame(g, b, side.name, colours[g.status]) for g, b in sorted(boxes, key=area, reverse=True)]
    parts += [_edge(u, item.name, cut, pos, row_of, side.name, colours["cut"])
              for item in side.items for u, cut in item.inputs if u in pos]
    parts += [_box(item, *pos[item.name], side.name, colours[item.status]) for item in side.items]
    return "\n".join(parts) + "\n</g>", right - left, bottom


def notes_panel(colours: dict, meaning: dict, notes: list[tuple], left: float) -> tuple[str, float, float]:
    """The legend, then the rules and the transfer report: (line, status or None) each."""
    parts = [f'<g class="fxs-notes"><text class="h" x="{left}" y="{TOP + 14}">legend</text>']
    y = TOP + 36
    for status, colour in colours.items():
        dash = ' stroke-dasharray="4 2"' if status == "cut" else ""
        parts.append(f'<g class="fxs-key" data-status="{status}"><rect x="{left}" y="{y - 10}" width="12" height="12" rx="2" '
                     f'fill="{colour}" fill-opacity="0.12" stroke="{colour}" stroke-width="2"{dash}/>'
                     f'<text class="x" x="{left + 18}" y="{y}">{status}: {esc(meaning[status])}</text></g>')
        y += LINE + 2
    y += LINE
    for line, status in notes:
        look = f' data-status="{status}" style="fill:{colours[status]}"' if status else ""
        parts.append(f'<text class="x" x="{left}" y="{y}"{look} xml:space="preserve">{esc(line)}</text>')
        y += LINE
    widest = max([len(f"{s}: {m}") + 3 for s, m in meaning.items()] + [len(n) for n, _ in notes])
    return "\n".join(parts) + "\n</g>", widest * CHAR + 24, y


def draw(title: str, sides: list, colours: dict, meaning: dict, notes: list[tuple]) -> str:
    """A standalone SVG: one panel per side, then the legend and the notes."""
    parts, left, bottom = [], 12.0, 0.0
    for side in sides:
        svg, width, low = panel(side, left, colours)
        parts.append(svg)
        left, bottom = left + width + 24, max(bottom, low)
    svg, width, low = notes_panel(colours, meaning, notes, left)
    parts.append(svg)
    w, h = int(left + width + 12), int(max(bottom, low) + 16)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            'font-family="ui-monospace,Menlo,Consolas,monospace">\n'
            f'<title>{esc(title)}</title><style>{_STYLE}</style>\n'
            '<defs><marker id="fxs-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
            'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8c959f"/></marker></defs>\n'
            f'<rect width="{w}" height="{h}" fill="#ffffff"/>\n'
            f'<text class="h" x="12" y="24">{esc(title)}</text>\n')
    return head + "\n".join(parts) + "\n</svg>\n"
