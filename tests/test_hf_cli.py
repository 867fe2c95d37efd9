"""`fxsurgery apply ... --format hf`: a save_pretrained directory plus surgery.json, from a rule file.

The rule file prunes two decoder layers of a tiny Llama and trims its
vocabulary to the even token ids; transformers alone reloads what was
written, and computes what the Python API's result computes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import cli
from hf_models import apply, ids, llama, logits, trim_by_hand

import fxsurgery as fxs

transformers = pytest.importorskip("transformers")

ROWS = list(range(0, 100, 2))
RULES = f"""fxsurgery: 1
description: Prune layers 1 and 2 and keep the even token ids.
rules:
  - layers: model.layers
    order: [0, 3]
  - replace: model.embed_tokens
    with: {{module: torch.nn.Embedding, num_embeddings: {len(ROWS)}, embedding_dim: 32}}
    weights: {{select: {ROWS}}}
"""
FACTORY = "from hf_models import llama\n\n\ndef tiny_llama():\n    return llama()\n"


def test_format_hf_writes_what_from_pretrained_reloads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    (tmp_path / "models.py").write_text(FACTORY)
    (tmp_path / "prune.yaml").write_text(RULES)
    out = tmp_path / "out"
    code, stdout, stderr = cli("apply", f"{tmp_path / 'models.py'}:tiny_llama", tmp_path / "prune.yaml",
                               "--input", "1x5:int64", "--format", "hf", "-o", out, "--quiet")
    assert code == 0, stderr
    files = sorted(os.listdir(out))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "surgery.json"]
    assert f"wrote {out}/ ({', '.join(files)})" in stdout
    record = json.loads((out / "surgery.json").read_text())
    assert record["saved_by"] == "save_pretrained" and record["mode"] == "kept class LlamaForCausalLM"
    first, second = (f"rule {r['rule']} '{r['text']}' ({r['origin']})" for r in record["rules"])
    assert (first, second.split(" (")[-1]) == (f"rule 1 'layers model.layers order=[0, 3]' ({tmp_path / 'prune.yaml'}:4)",
                                               f"{tmp_path / 'prune.yaml'}:6)")
    assert record["report"]["notes"][1:4] == [f"config.num_hidden_layers: 4 -> 2 ({first})",
                                              f"layer_idx of 1 modules in model.layers: set to their new layer ({first})",
                                              f"config.vocab_size: 100 -> 50 ({second})"]

    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    model = llama()
    hand = trim_by_hand(model, ROWS)
    hand.model.layers = torch.nn.ModuleList([hand.model.layers[0], hand.model.layers[3]])
    hand.model.layers[1].self_attn.layer_idx = 1
    hand.config.num_hidden_layers = 2
    python = apply(model, fxs.load_rules(tmp_path / "prune.yaml")).module
    x = ids(2, 7, vocab=len(ROWS))
    assert (loaded.config.num_hidden_layers, loaded.config.vocab_size) == (2, 50)
    assert torch.equal(logits(loaded, x), logits(python, x))
    assert torch.allclose(logits(loaded, x), logits(hand, x), atol=1e-6, rtol=0)


def test_format_hf_on_a_model_that_is_not_a_transformers_model_is_refused(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - delete: layer4.1\n")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", rules, "--input", "2x3x32x32", "--format", "hf",
                               "-o", tmp_path / "out", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()
    assert stderr == ("fxsurgery: error: format hf: the result is a regenerated graph module, which has no save_pretrained; fix: "
                      "apply to a transformers model (kept as its class by default), or leave format hf out\n")
