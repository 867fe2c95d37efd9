"""The before/after diff: statuses counted node by node, colours, report rows, escaping, files, Chromium."""

import base64
import dataclasses
import hashlib
import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from html import escape
from html.parser import HTMLParser

import pytest
import torch
import torchvision
from conftest import RULES
from torch import nn

import fxsurgery as fxs
from fxsurgery.views import _diff as diff
from fxsurgery.views._svg import BOX_H, BOX_W

CHROMIUM = "/usr/bin/chromium"
SVG = "{http://www.w3.org/2000/svg}"
STATUSES = ("deleted", "inserted", "replaced", "cut", "frozen", "kept")
# resnet18's traced-through modules: layer1..4, two blocks each, a downsample in layer2..4
GROUPS = 4 + 8 + 3
FROZEN_GROUPS = {"layer1", "layer1.0", "layer1.1", "layer2", "layer2.0", "layer2.0.downsample", "layer2.1",
                 "layer3", "layer3.0", "layer3.0.downsample", "layer3.1"}


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def surgery(rules, model=None, size=64):
    return fxs.apply(model or resnet18(), rules, example_inputs=(torch.randn(1, 3, size, size),))


@pytest.fixture(scope="module")
def demo():
    """The surgery `fxsurgery demo` runs, on a smaller input."""
    return surgery([os.path.join(RULES, "resnet-finetune.yaml")])


@pytest.fixture(scope="module")
def page(demo):
    return diff.render_html(demo)


@pytest.fixture(scope="module")
def drawing(demo):
    return diff.render_svg(demo)


class Elements(HTMLParser):
    """Every start tag as a dict of its attributes, with the side and module groups it sits in."""

    VOID = frozenset({"meta", "input", "br", "img", "hr", "link"})

    def __init__(self, text):
        super().__init__()
        self.found, self.open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs, tag=tag)
        a["side"] = next((o["data-side"] for o in reversed(self.open) if "data-side" in o), None)
        a["groups"] = [o["data-module"] for o in self.open if "fxs-group" in o.get("class", "")]
        self.found.append(a)
        if tag not in self.VOID:
            self.open.append(a)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass

    def of(self, cls, side=None):
        return [a for a in self.found if cls in a.get("class", "").split() and (side is None or a["side"] == side)]


def svg_elements(text, cls, side=None):
    root = ET.fromstring(text)   # also proves the drawing is well-formed XML
    return [e for e in root.iter() if e.get("class") == cls and (side is None or e.get("data-side") == side)]


def statuses(elements):
    return Counter(e.get("data-status") for e in elements)


# -- what each node and group says ----------------------------------------------

def test_demo_nodes_by_status(demo, page):
    doc = Elements(page)
    before, after = doc.of("fxs-node", "before"), doc.of("fxs-node", "after")
    assert statuses(before) == {"replaced": 1, "frozen": 30, "kept": 40}
    assert statuses(after) == {"inserted": 1, "cut": 1, "replaced": 1, "frozen": 30, "kept": 40}
    assert len(before) == len(demo.original.graph.nodes) == 71 and len(after) == len(demo.module.graph.nodes) == 73
    by_name = {(a["side"], a["data-node"]): a for a in before + after}
    dropout = by_name["after", "avgpool_dropout"]
    assert (dropout["data-status"], dropout["data-op"], dropout["data-module"], dropout["data-rule"]) == ("inserted", "call_module", "avgpool_dropout", "4")
    assert dropout["groups"] == []          # beside avgpool, not inside it
    detach = by_name["after", "layer3_1_relu_1_detach"]
    assert (detach["data-status"], detach["data-op"], detach["data-rule"], detach["groups"]) == ("cut", "call_method", "3", [])
    for side in ("before", "after"):
        fc = by_name[side, "fc"]
        assert (fc["data-status"], fc["data-module"], fc["data-rule"]) == ("replaced", "fc", "1")
    # every module whose parameters a rule froze, and nothing else, is frozen on both sides
    owners = {name.rpartition(".")[0] for name in demo.report.frozen}
    assert len(demo.report.frozen) == 45 and len(owners) == 30
    for side in (before, after):
        assert {a["data-module"] for a in side if a["data-status"] == "frozen"} == owners
        assert {a["data-rule"] for a in side if a["data-status"] == "frozen"} == {"2"}


def test_demo_node_text_shows_type_and_shape(page):
    def text(side, name):
        section = page.split(f'data-side="{side}"')[1]
        row = section.split(f'data-node="{name}"')[1].split("</div>")[0]
        return " ".join(re.sub(r"<[^>]+>", " ", row.partition(">")[2]).split())
    assert text("before", "fc") == "fc Linear [1, 1000] &larr; flatten"
    assert text("after", "fc") == "fc Linear [1, 10] &larr; flatten"
    assert text("after", "flatten") == "flatten flatten [1, 512] &larr; avgpool_dropout"
    assert text("after", "layer3_1_relu_1_detach") == "layer3_1_relu_1_detach .detach() [1, 256, 4, 4] &larr; layer3_1_relu_1"


def test_demo_groups_and_cut_edges(demo, page):
    doc = Elements(page)
    for side in ("before", "after"):
        groups = doc.of("fxs-group", side)
        assert len(groups) == GROUPS
        assert {g["data-module"] for g in groups if g["data-status"] == "frozen"} == FROZEN_GROUPS
        assert statuses(groups) == {"frozen": 11, "kept": 4}
        nested = {g["data-module"]: g["groups"] for g in groups}
        assert nested["layer2.0.downsample"] == ["layer2", "layer2.0"]
        # no group holds a structural change; layer4.0 (and what holds it) reads a cut edge, so only they start open
        assert {g["data-module"] for g in groups if "open" in g} == {"layer4", "layer4.0", "layer4.0.downsample"}
    cut = [(e["side"], e["data-from"]) for e in doc.of("fxs-edge") if e["data-status"] == "cut"]
    assert sorted(cut) == [("after", "layer3_1_relu_1_detach")] * 2 + [("before", "layer3_1_relu_1")] * 2
    graphs = list(demo.original.graph.nodes) + list(demo.module.graph.nodes)
    assert len(doc.of("fxs-edge")) == sum(len(n.all_input_nodes) for n in graphs)


def test_delete_replace_insert_detach_inside_groups():
    result = surgery([fxs.Delete("layer4.1"), fxs.Replace("layer3.1", nn.Identity()),
                      fxs.Insert(nn.Dropout(0.1), after="layer1.0.conv1"), fxs.Detach(before="layer2.0.conv1")])
    doc = Elements(diff.render_html(result))
    assert statuses(doc.of("fxs-node", "before")) == {"deleted": 7, "replaced": 7, "kept": 57}
    assert statuses(doc.of("fxs-node", "after")) == {"inserted": 1, "cut": 1, "replaced": 1, "kept": 57}
    before = {g["data-module"]: g["data-status"] for g in doc.of("fxs-group", "before")}
    assert (before["layer4.1"], before["layer3.1"], before["layer4"]) == ("deleted", "replaced", "kept")
    after = {g["data-module"] for g in doc.of("fxs-group", "after")}
    assert "layer4.1" not in after and "layer3.1" not in after
    nodes = {a["data-node"]: a for a in doc.of("fxs-node", "after")}
    assert (nodes["layer3_1"]["data-status"], nodes["layer3_1"]["groups"]) == ("replaced", ["layer3"])
    assert (nodes["layer1_0_conv1_dropout"]["data-status"], nodes["layer1_0_conv1_dropout"]["groups"]) == ("inserted", ["layer1", "layer1.0"])
    assert nodes["layer1_1_relu_1_detach"]["groups"] == []   # on the edge into layer2, in neither group
    assert {a["data-node"] for a in doc.of("fxs-node", "before") if a["data-status"] == "deleted"} == {
        "layer4_1_conv1", "layer4_1_bn1", "layer4_1_relu", "layer4_1_conv2", "layer4_1_bn2", "add_7", "layer4_1_relu_1"}


def test_no_rules_marks_nothing():
    result = surgery([])
    doc = Elements(diff.render_html(result))
    for side in ("before", "after"):
        assert statuses(doc.of("fxs-node", side)) == {"kept": 71}
        assert statuses(doc.of("fxs-group", side)) == {"kept": GROUPS}
        assert not [e for e in doc.of("fxs-edge", side) if e["data-status"] == "cut"]
        assert not [g for g in doc.of("fxs-group", side) if "open" in g]
    assert doc.of("fxs-tensor") and statuses(doc.of("fxs-tensor")) == {"transferred": 122}
    drawing = diff.render_svg(result)
    assert statuses(svg_elements(drawing, "fxs-node")) == {"kept": 142}
    assert statuses(svg_elements(drawing, "fxs-edge")) == {"kept": statuses(doc.of("fxs-edge"))["kept"]}


# -- colours, legend, report -----------------------------------------------------

def test_colours_and_legend(page, drawing):
    assert diff.COLOURS == {"deleted": "#cf222e", "inserted": "#1a7f37", "replaced": "#bc4c00",
                            "cut": "#8250df", "frozen": "#0969da", "kept": "#8c959f"}
    for status, colour in diff.COLOURS.items():
        assert f'[data-status="{status}"]{{--c:{colour};--bg:{colour}1a}}' in page
    legend = Elements(page).of("fxs-key")
    assert [k["data-status"] for k in legend] == list(STATUSES)
    assert '<li class="fxs-key" data-status="frozen"><b>frozen</b>: a module whose parameters are all frozen in the new module</li>' in page
    # tensors take the colour of the node status that means the same
    assert '[data-status="new"]{--c:#1a7f37;' in page and '[data-status="dropped"]{--c:#cf222e;' in page
    for box in svg_elements(drawing, "fxs-node"):
        rect = box.find(f"{SVG}rect")
        assert rect.get("stroke") == diff.COLOURS[box.get("data-status")]
        assert (rect.get("stroke-dasharray") == "5 3") == (box.get("data-status") == "cut")
    keys = svg_elements(drawing, "fxs-key")
    assert [(k.get("data-status"), k.find(f"{SVG}rect").get("stroke")) for k in keys] == list(diff.COLOURS.items())


def test_report_rows(demo, page):
    doc = Elements(page)
    rows = doc.of("fxs-tensor")
    assert len(rows) == len(demo.report.entries) == 124
    assert statuses(rows) == {"transferred": 120, "new": 2, "dropped": 2}
    assert [r["data-status"] for r in rows[:4]] == ["new", "new", "dropped", "dropped"]   # changes first
    assert sum(r["data-frozen"] == "true" for r in rows) == 45
    fc = [(r["data-tensor"], r["data-status"]) for r in rows if r["data-tensor"].startswith("fc.")]
    assert fc == [("fc.weight", "new"), ("fc.bias", "new"), ("fc.weight", "dropped"), ("fc.bias", "dropped")]
    label = demo.plan.matches[0].label
    assert label == f"rule 1 'replace fc with Linear(out_features=10)' ({os.path.join(RULES, 'resnet-finetune.yaml')}:8)"
    assert ('<tr class="fxs-tensor" data-tensor="fc.weight" data-status="new" data-frozen="false"><td>fc.weight'
            f'<div class="why">made by {escape(label)}</div></td><td class="st">new</td><td>[10, 512] float32</td><td class="fz"></td></tr>') in page
    assert ('<tr class="fxs-tensor" data-tensor="fc.weight" data-status="dropped" data-frozen="false"><td>fc.weight'
            '<div class="why">not used by the new module</div></td><td class="st">dropped</td><td>[1000, 512] float32</td><td class="fz"></td></tr>') in page
    assert ('<tr class="fxs-tensor" data-tensor="conv1.weight" data-status="transferred" data-frozen="true"><td>conv1.weight</td>'
            '<td class="st">transferred</td><td>[64, 3, 7, 7] float32</td><td class="fz">frozen</td></tr>') in page
    rules = doc.of("fxs-rules")[0]
    assert rules["tag"] == "table"
    rule_rows = [a for a in doc.found if a["tag"] == "tr" and "data-rule" in a]
    assert [(r["data-rule"], r["data-status"]) for r in rule_rows] == [("1", "replaced"), ("2", "frozen"), ("3", "cut"), ("4", "inserted")]
    for m in demo.plan.matches:
        assert f"<td>{escape(m.label)}</td><td>{m.count}</td>" in page
    assert "conv1, bn1, layer1.0.conv1, layer1.0.bn1, ... (+26)" in page
    assert "<tr class=\"fxs-total\"><td>total</td><td>120</td><td>0</td><td>2</td><td>2</td><td>45</td></tr>" in page


def test_html_is_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"\s(src|href|action)=", page)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'" in page


def test_hostile_module_name_is_escaped():
    hostile = "<script>alert(1)</script>"

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(hostile, nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(getattr(self, hostile)(x))

    torch.manual_seed(0)
    result = fxs.apply(Model(), [fxs.Freeze("*", exclude=["head"])], example_inputs=(torch.randn(1, 4),))
    page = diff.render_html(result)
    assert page.count("<script") == 1 and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    doc = Elements(page)
    assert [(g["side"], g["data-module"], g["data-status"]) for g in doc.of("fxs-group")] == [
        ("before", hostile, "frozen"), ("after", hostile, "frozen")]
    assert {a["data-module"] for a in doc.of("fxs-node") if a["data-status"] == "frozen"} == {hostile + ".0"}
    assert {r["data-tensor"] for r in doc.of("fxs-tensor") if r["data-frozen"] == "true"} == {hostile + ".0.weight", hostile + ".0.bias"}
    drawing = diff.render_svg(result)
    assert "<script" not in drawing
    assert [g.get("data-module") for g in svg_elements(drawing, "fxs-group")] == [hostile, hostile]


# -- SVG ---------------------------------------------------------------------------

def test_svg_shows_the_same(page, drawing, demo):
    doc = Elements(page)
    for side in ("before", "after"):
        assert statuses(svg_elements(drawing, "fxs-node", side)) == statuses(doc.of("fxs-node", side))
        groups = svg_elements(drawing, "fxs-group", side)
        assert len(groups) == GROUPS and {g.get("data-module") for g in groups if g.get("data-status") == "frozen"} == FROZEN_GROUPS
        cut = [e for e in svg_elements(drawing, "fxs-edge", side) if e.get("data-status") == "cut"]
        assert [(e.get("data-to"), e.get("stroke"), e.get("stroke-dasharray")) for e in cut] == [
            ("layer4_0_conv1", "#8250df", "5 3"), ("layer4_0_downsample_0", "#8250df", "5 3")]
    text = "\n".join(e.text or "" for e in ET.fromstring(drawing).iter(f"{SVG}text"))
    for m in demo.plan.matches:
        assert f"{m.label}: {m.count} matched" in text
    assert "  new         fc.weight [10, 512] float32: made by rule 1" in text
    assert re.findall(r"https?://[^\"]*", drawing) == ["http://www.w3.org/2000/svg"]   # the namespace, never fetched
    # parallel branches share rows: the downsample conv sits beside the block's first conv
    boxes = {e.get("data-node"): e.find(f"{SVG}rect") for e in svg_elements(drawing, "fxs-node", "after")}
    assert boxes["layer2_0_downsample_0"].get("y") == boxes["layer2_0_conv1"].get("y")
    assert float(boxes["layer2_0_downsample_0"].get("x")) > float(boxes["layer2_0_conv1"].get("x"))
    assert int(ET.fromstring(drawing).get("height")) < 3500


def test_svg_frames_never_overlap_a_node_they_do_not_hold(drawing):
    for side in ("before", "after"):
        nodes = {e.get("data-node"): e.find(f"{SVG}rect") for e in svg_elements(drawing, "fxs-node", side)}
        members = {}
        for e in svg_elements(drawing, "fxs-group", side):
            rect = e.find(f"{SVG}rect")
            members[e.get("data-key")] = [float(rect.get(k)) for k in ("x", "y", "width", "height")]
        for key, (x, y, w, h) in members.items():
            for name, rect in nodes.items():
                nx_, ny = float(rect.get("x")), float(rect.get("y"))
                inside = x <= nx_ and nx_ + BOX_W <= x + w and y <= ny and ny + BOX_H <= y + h
                overlaps = nx_ < x + w and x < nx_ + BOX_W and ny < y + h and y < ny + BOX_H
                assert inside or not overlaps, (side, key, name)


# -- files -------------------------------------------------------------------------

def test_write_chooses_by_suffix_and_replaces_atomically(demo, page, drawing, tmp_path):
    target = tmp_path / "diff.html"
    target.write_text("old")
    with pytest.raises(fxs.SaveError) as err:  # nothing is lost unless asked
        fxs.diff(demo, target)
    assert str(err.value) == f"{target}: already exists; fix: pass force=True to replace it, or choose another name"
    assert target.read_text() == "old"
    (tmp_path / "pages.html").mkdir()
    with pytest.raises(fxs.SaveError) as err:  # was an internal error naming a rename
        fxs.diff(demo, tmp_path / "pages.html", force=True)
    assert str(err.value) == f"{tmp_path / 'pages.html'}: is a directory; fix: name a file in it, e.g. {tmp_path / 'pages.html' / 'diff.html'}"
    (tmp_path / "pages.html").rmdir()
    assert fxs.diff(demo, target, force=True) == target and target.read_text() == page
    assert fxs.diff(demo, str(tmp_path / "diff.svg")).read_text() == drawing
    assert sorted(os.listdir(tmp_path)) == ["diff.html", "diff.svg"]      # no temporary file left
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    with pytest.raises(fxs.SaveError) as err:
        fxs.diff(demo, tmp_path / "diff.png")
    assert str(err.value) == f"{tmp_path / 'diff.png'}: cannot tell the format from the suffix '.png'; fix: name the file .html or .svg"
    with pytest.raises(fxs.SaveError) as err:
        fxs.diff(demo, tmp_path / "missing" / "diff.html")
    assert str(err.value) == f"{tmp_path / 'missing' / 'diff.html'}: cannot write there: No such file or directory; fix: choose a writable directory"
    assert sorted(os.listdir(tmp_path)) == ["diff.html", "diff.svg"]
    with pytest.raises(fxs.SaveError) as err:
        fxs.diff(dataclasses.replace(demo, original=None), tmp_path / "diff.html", force=True)
    assert str(err.value) == ("the result has no graph of the whole original, so there is no single graph to compare; "
                              "fix: make the model traceable (leaf_paths=) or list what changed with 'fxsurgery apply --explain'")


# -- in a browser --------------------------------------------------------------------

def chromium(tmp_path, page):
    """(dumped DOM, console lines) of `page` opened in headless Chromium, offline and with a fresh profile."""
    path = tmp_path / "page.html"
    path.write_text(page)
    profile = tmp_path / "profile"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()],
                          check=True, capture_output=True, text=True, timeout=90)
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium")
def test_chromium_renders_groups_without_console_errors(page, tmp_path):
    dom, console = chromium(tmp_path, page)
    assert console == []
    body = Elements(dom).of("fxs-diff")[0]
    assert body["tag"] == "main"
    (opened,) = [a for a in Elements(dom).found if a["tag"] == "body"]
    # the script ran (the policy let it) and saw every group and node
    assert (opened["data-rendered-groups"], opened["data-rendered-nodes"]) == (str(2 * GROUPS), "144")
    assert '<span id="fxs-status" class="fxs-summary">30 module groups, 144 nodes</span>' in dom
    # the twins: a script that fails is reported; a script slipped into the page is refused, and reported
    broken = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace("document.body.dataset", "document.bodyy.dataset", 1)
    dom, console = chromium(tmp_path, broken)
    assert len(console) == 1 and "Uncaught TypeError" in console[0] and "data-rendered-groups" not in dom
    dom, console = chromium(tmp_path, page.replace("</main>", "</main><script>document.title = 'pwned'</script>"))
    assert len(console) == 1 and "Content Security Policy" in console[0] and "pwned" not in dom.split("</title>")[0]


def test_a_prune_rule_marks_the_layers_it_narrows(tmp_path):
    """The diff of prune-half failed with KeyError 'prune' (the rule kind had no colour): its layers are replaced."""
    torch.manual_seed(0)
    result = fxs.apply(torchvision.models.resnet18().eval(), fxs.load_rules(f"{RULES}/prune-half.yaml"),
                       example_inputs=(torch.randn(1, 3, 64, 64),))
    fxs.diff(result, tmp_path / "d.html")
    marked = set(re.findall(r'data-node="(\w+)" data-status="replaced" data-op="call_module" data-rule="1"',
                            (tmp_path / "d.html").read_text()))
    blocks = [f"layer{i}_{j}" for i in range(1, 5) for j in range(2)]  # each pruned conv1, its BatchNorm, the conv2 reading it
    assert marked == {f"{b}_{layer}" for b in blocks for layer in ("conv1", "bn1", "conv2")}
