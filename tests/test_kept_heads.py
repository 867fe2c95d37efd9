"""A model kept as its own class: the class count it keeps outside its modules follows a head swap."""

import pytest
import torch
from torch import nn

import fxsurgery as fxs

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("efficientnet_b0", "classifier"), ("vit_tiny_patch16_224", "head")])
def test_num_classes_follows_a_head_swap(name, head):
    """model.num_classes stayed 1000 after the head became 7 outputs (reset_classifier and training scripts read it)."""
    model = timm.create_model(name, pretrained=False, **({"img_size": 32} if "vit" in name else {})).eval()
    x = torch.randn(2, 3, 32, 32)
    rules = fxs.load_rules("classifier-head", params={"num_classes": 7, "head": head})
    result = fxs.apply(model, rules, example_inputs=(x,), keep_class=True)
    assert type(result.module) is type(model)
    assert (result.module.num_classes, model.num_classes) == (7, 1000)
    assert result.module(x).shape == (2, 7) and result.module.get_classifier().out_features == 7
    assert [n for n in result.report.notes if n.startswith("num_classes")] == [f"num_classes: 1000 -> 7 ({result.plan.matches[0].label})"]
    features = fxs.apply(model, [fxs.Replace(head, nn.Identity())], example_inputs=(x,), keep_class=True)
    assert features.module.num_classes == 0   # as timm's own reset_classifier(0)
    assert torch.equal(features.module(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_num_classes_follows_a_head_with_a_layer_inserted_beside_it():
    """A Dropout inserted before the new head (or a Linear after it) wraps it: num_classes stayed 1000 with 4 outputs."""
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    head = fxs.Replace("fc", fxs.new(nn.Linear, out_features=4))
    for extra, classes in [(fxs.Insert(nn.Dropout(0.2), before="fc"), 4), (fxs.Insert(nn.Linear(4, 6), after="fc"), 6),
                           (fxs.Insert(nn.Identity(), after="fc"), 4)]:
        result = fxs.apply(model, [head, extra], example_inputs=(x,), keep_class=True)
        assert (result.module.num_classes, result.module(x).shape, model.num_classes) == (classes, (2, classes), 1000)


def test_num_labels_follows_an_mlp_head():
    """mlp-head (torchvision.ops.MLP: ..., Linear, Dropout) left num_labels at 5 with 3 outputs, and a call with
    labels failed: "shape '[-1, 5]' is invalid for input of size 6"."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=100, num_labels=5)
    bert = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    rules = fxs.load_rules("mlp-head", params={"head": "classifier", "num_classes": 3, "hidden": 16})
    result = fxs.apply(bert, rules, example_inputs=(ids,))
    assert (result.module.config.num_labels, result.module.num_labels, bert.config.num_labels) == (3, 3, 5)
    out = result.module(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    assert torch.equal(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
