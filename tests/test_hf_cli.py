"""`fxsurgery apply ... --format hf`: a save_pretrained directory plus surgery.json, from a rule file.

The rule file prunes two decoder layers of a tiny Llama and trims its
vocabulary to the even token ids; transformers alone reloads what was
written, and computes what the Python API's result computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli
from hf_models import apply, gpt2, ids, llama, logits, trim_by_hand
from safetensors.torch import load_file

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
    # the output is a MODEL for the next surgery: it was refused ('load it with from_pretrained'), a dead end in a shell
    (tmp_path / "freeze.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: model.layers.0\n")
    code, stdout, stderr = cli("apply", out, tmp_path / "freeze.yaml", "--input", "1x5:int64", "-o", tmp_path / "again", "--quiet")
    assert (code, stderr) == (0, "")
    again = fxs.load(tmp_path / "again")
    assert type(again) is transformers.LlamaForCausalLM and torch.equal(logits(again, x), logits(python, x))
    frozen = [n for n, p in again.named_parameters() if not p.requires_grad]
    assert frozen == [n for n, _ in again.named_parameters() if n.startswith("model.layers.0.")] and len(frozen) == 9


def test_format_hf_on_a_model_that_is_not_a_transformers_model_is_refused(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - delete: layer4.1\n")
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", rules, "--input", "2x3x32x32", "--format", "hf",
                               "-o", tmp_path / "out", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()
    assert stderr == ("fxsurgery: error: format hf: the result is a regenerated graph module, which has no save_pretrained; fix: "
                      "apply to a transformers model (kept as its class by default), or leave format hf out\n")


LOAD = """import sys, torch, transformers, fxsurgery as fxs
from safetensors.torch import save_file
out = fxs.load(sys.argv[1])(torch.load(sys.argv[2]))
save_file({"logits": out.logits}, sys.argv[3])
print(type(out).__name__)
"""


def test_a_graph_result_of_a_transformers_model_loads_where_transformers_was_imported(tmp_path):
    """The graph's output is a CausalLMOutput, which torch reads once transformers.modeling_outputs registered
    it; `import transformers` alone imports that module lazily, so load imports it (asking it to was no fix)."""
    from conftest import cli_process
    model = gpt2()
    model.config.use_cache = False  # a graph takes no cache object
    result = apply(model, [fxs.Freeze("transformer.h.0")], keep_class=False)
    result.save(tmp_path / "out")
    x = ids(2, 9)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "load.py").write_text(LOAD)
    proc = subprocess.run([sys.executable, tmp_path / "load.py", tmp_path / "out", tmp_path / "x.pt", tmp_path / "y.safetensors"],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "CausalLMOutputWithCrossAttentions\n"), proc.stderr
    assert torch.equal(load_file(tmp_path / "y.safetensors")["logits"], logits(model, x))

    code, stdout, stderr = cli_process("inspect", tmp_path / "out")
    assert (code, stdout) == (2, "")
    assert stderr == (f"fxsurgery: error: {tmp_path / 'out' / 'graph.json'}: call: output type "
                      "transformers.modeling_outputs.CausalLMOutputWithCrossAttentions is read once its library is imported; "
                      "fix: import transformers first, or pass --allow-module transformers (allow=('transformers',))\n")
    code, stdout, stderr = cli_process("inspect", tmp_path / "out", "--allow-module", "transformers", "--json")
    assert code == 0, stderr
    runs = {m["path"]: m["runs"] for m in json.loads(stdout)["modules"]}
    assert (runs["transformer.h.0.mlp.c_fc"], runs["transformer.h.0.mlp"], runs["lm_head"]) == ("weights", "container", "graph")


def test_token_ids_beyond_the_positions_are_the_original_models_failure_not_an_internal_error():
    """Fake tensors read no values, so 40 positions of a 16-position GPT-2 pass the capture; the first real run
    (the check that a size-1 batch may stay general) is where it fails, and it says what the model says."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16,
                                                                 use_cache=False)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxs.ModelError) as err:
        apply(model, [fxs.Freeze("transformer.h.0")], (ids(1, 40),), keep_class=False)
    assert str(err.value) == ("the original model fails on the example inputs: IndexError: index out of range in self; "
                              "fix: pass inputs the original model accepts")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    result = apply(model, [fxs.Freeze("transformer.h.0")], (ids(1, 16),), keep_class=False)
    assert torch.equal(logits(result.module, ids(3, 12)), logits(model, ids(3, 12)))
