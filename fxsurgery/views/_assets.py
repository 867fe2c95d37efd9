"""The diff page's own stylesheet and script, inline in every page (nothing is fetched)."""

import base64
import hashlib

CSS = """:root{font:13px/1.4 system-ui,sans-serif;color:#1f2328;background:#fff}
body{margin:16px 20px}h1{font-size:18px;margin:0}h2{font-size:15px;margin:4px 0 8px}h2 small{font-weight:400;color:#57606a}
.fxs-summary{color:#57606a;margin:4px 0 4px 12px}.fxs-tools{margin:6px 0 10px}.fxs-tools button{font:inherit;margin-right:6px}
.fxs-legend{display:flex;flex-wrap:wrap;gap:4px 16px;list-style:none;padding:0;margin:8px 0}
.fxs-key::before{content:"";display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:-1px;\
background:var(--bg);border:2px solid var(--c);border-radius:3px}
.fxs-key b{color:var(--c)}
.fxs-diff{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr) minmax(0,1.45fr);gap:18px;align-items:start}
.fxs-node{font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;border-left:4px solid var(--c);background:var(--bg);\
margin:2px 0;padding:1px 6px;border-radius:3px}
.fxs-node .t,.fxs-node .s,summary .t{color:#57606a}.fxs-node .in{color:#8c959f;font-size:11px}
.fxs-node[data-status=deleted] .n{text-decoration:line-through}.fxs-node[data-status=cut]{border-left-style:dashed}
.fxs-edge[data-status=cut]{color:var(--c);font-weight:700;text-decoration:underline dashed}
details.fxs-group{border-left:2px solid var(--c);margin:3px 0;padding-left:8px}
details.fxs-group>summary{cursor:pointer;font:600 12px/1.5 ui-monospace,Menlo,Consolas,monospace;background:var(--bg);padding:1px 4px;border-radius:3px}
.fxs-badge{color:var(--c);font-weight:600;margin-left:6px}
body.fxs-changes-only .fxs-node[data-status=kept]{display:none}
table{border-collapse:collapse;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;width:100%;margin-bottom:12px}
th{background:#f6f8fa;position:sticky;top:0}td,th{padding:2px 6px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
tr[data-status]>td:first-child{border-left:4px solid var(--c)}td.st{color:var(--c);font-weight:600}
.fxs-scroll{max-height:75vh;overflow:auto}.fxs-tensors td{white-space:nowrap}.fxs-tensors .why{white-space:normal;color:#57606a;max-width:34ch}
"""

JS = """(function () {
  "use strict";
  function all(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function open(value) { all("details.fxs-group").forEach(function (d) { d.open = value; }); }
  document.getElementById("fxs-expand").addEventListener("click", function () { open(true); });
  document.getElementById("fxs-collapse").addEventListener("click", function () { open(false); });
  document.getElementById("fxs-changes").addEventListener("change", function (e) {
    document.body.classList.toggle("fxs-changes-only", e.target.checked);
  });
  var groups = all("details.fxs-group"), nodes = all(".fxs-node");
  document.body.dataset.renderedGroups = String(groups.length);
  document.body.dataset.renderedNodes = String(nodes.length);
  document.getElementById("fxs-status").textContent = groups.length + " module groups, " + nodes.length + " nodes";
})();
"""


def csp() -> str:
    # Only this page's own script may run and nothing may be fetched: a name
    # that escaping missed still could not execute or call out.
    digest = base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    return f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
