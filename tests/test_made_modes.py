"""A module a rule makes runs in the mode of the model it joins: a Dropout or BatchNorm built in train mode
(as every module is built) inside an eval-mode model dropped and updated statistics while the model said eval."""

import pytest
import torch
import torchvision
from torch import nn

import fxsurgery as fxs
from fxsurgery import Insert, Replace


def _resnet(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).train(mode == "train")


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """resnet18 up to its pooled, flattened features (what fc takes)."""
    body = nn.Sequential(*list(model.children())[:-1])
    return torch.flatten(body(x), 1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_inserted_dropout_follows_the_model_mode(mode):
    model = _resnet(mode)
    x = torch.randn(2, 3, 64, 64)
    dropout = nn.Dropout(0.5)  # built in train mode, as every module is
    result = fxs.apply(model, [Insert(dropout, after="avgpool")], example_inputs=(x,))
    made = result.module.get_submodule("avgpool_dropout")
    assert (made.training, result.module.training, dropout.training) == (mode == "train", mode == "train", True)
    model.eval(), result.module.eval()
    assert torch.equal(result.module(x), model(x)) and torch.equal(result.module(x), result.module(x))
    result.module.train()
    torch.manual_seed(5)
    dropped = result.module(x)
    with torch.no_grad():
        model.train()
        features = _features(model, x)
        torch.manual_seed(5)
        expected = model.fc(nn.functional.dropout(features, 0.5, True))
    assert torch.allclose(dropped, expected, atol=1e-6) and not torch.allclose(dropped, model.fc(features))


def test_a_new_batchnorm_in_an_eval_model_takes_a_batch_of_one_and_its_statistics():
    # built in train mode, the BatchNorm1d refused the example's batch of one at the shape pass
    model = _resnet("eval")
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(model, [Insert(fxs.new(nn.BatchNorm1d), before="fc")], example_inputs=(x,))
    norm = result.module.get_submodule("fc_batch_norm1d")
    assert not norm.training and norm.num_features == 512
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with torch.no_grad():
        expected = model.fc(_features(model, x) / torch.sqrt(torch.tensor(1 + norm.eps)))  # mean 0, variance 1
    assert torch.allclose(result.module(x), expected, atol=1e-6)
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())


def test_a_replacement_instance_is_copied_into_the_model_mode_and_left_as_given():
    model = _resnet("eval")
    head = nn.Sequential(nn.Dropout(0.3), nn.Linear(512, 4))
    result = fxs.apply(model, [Replace("fc", head)], example_inputs=(torch.randn(2, 3, 64, 64),))
    assert [m.training for m in result.module.get_submodule("fc").modules()] == [False, False, False]
    assert [m.training for m in head.modules()] == [True, True, True]
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(result.module(x), result.module(x))
