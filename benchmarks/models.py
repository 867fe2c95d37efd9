"""The 25 torchvision classifiers and the six-rule fine-tuning surgery for each.

Every model is built with weights=None (random, seeded; nothing downloaded)
and put in eval mode. Inputs are the smallest size the model accepts among
64, 75 and 224: the pipeline's work grows with the graph, not the pixels,
and small inputs keep shape propagation off the critical path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace


@dataclass(frozen=True)
class Surgery:
    """Where the six rules act on one model."""

    name: str
    size: int                   # square input side
    head: str                   # classifier to swap (in_features inferred)
    keep: tuple[str, ...]       # globs left trainable: the last stage (and the head)
    cut: str                    # Detach(after=cut): no gradient into the frozen part
    delete: str                 # a shape-preserving module (dropout, norm, activation)
    heavy: bool = False         # skipped by --quick
    kwargs: dict = field(default_factory=dict)  # torchvision constructor arguments
    conv_head: bool = False     # the head is a 1x1 Conv2d (squeezenet)


def _resnet(name: str, heavy: bool = False) -> Surgery:
    return Surgery(name, 64, "fc", ("layer4.*",), "layer3", "layer1.0.bn1", heavy)


MODELS: list[Surgery] = [
    _resnet("resnet18"),
    _resnet("resnet50"),
    _resnet("resnet152", heavy=True),
    _resnet("wide_resnet50_2", heavy=True),
    _resnet("resnext50_32x4d"),
    Surgery("mobilenet_v2", 64, "classifier.1", ("features.18.*",), "features.17", "classifier.0"),
    Surgery("mobilenet_v3_large", 64, "classifier.3", ("features.16.*",), "features.15", "classifier.2"),
    Surgery("efficientnet_b0", 64, "classifier.1", ("features.8.*",), "features.7", "classifier.0"),
    Surgery("efficientnet_v2_s", 64, "classifier.1", ("features.7.*",), "features.6", "classifier.0", heavy=True),
    Surgery("convnext_tiny", 64, "classifier.2", ("features.7.*",), "features.6", "features.1.0.stochastic_depth"),
    Surgery("convnext_base", 64, "classifier.2", ("features.7.*",), "features.6", "features.1.0.stochastic_depth", heavy=True),
    Surgery("vit_b_16", 224, "heads.head", ("encoder.layers.encoder_layer_11.*", "encoder.ln"),
            "encoder.layers.encoder_layer_10", "encoder.dropout"),
    Surgery("vit_l_16", 224, "heads.head", ("encoder.layers.encoder_layer_23.*", "encoder.ln"),
            "encoder.layers.encoder_layer_22", "encoder.dropout", heavy=True),
    Surgery("swin_t", 64, "head", ("features.7.*", "norm"), "features.6", "features.1.0.mlp.2"),
    Surgery("swin_v2_t", 64, "head", ("features.7.*", "norm"), "features.6", "features.1.0.mlp.2"),
    # maxvit's relative position tables are built for 224 (7x7 windows at every stage)
    Surgery("maxvit_t", 224, "classifier.5", ("blocks.3.*", "classifier.*"), "blocks.2", "classifier.4", heavy=True),
    Surgery("densenet121", 64, "classifier", ("features.denseblock4.*",), "features.transition3", "features.norm5"),
    Surgery("regnet_y_400mf", 64, "fc", ("trunk_output.block4.*",), "trunk_output.block3", "stem.1"),
    Surgery("mnasnet1_0", 64, "classifier.1", ("layers.1[3-6]*",), "layers.12", "classifier.0"),
    Surgery("shufflenet_v2_x1_0", 64, "fc", ("stage4.*", "conv5.*"), "stage3", "conv1.1"),
    Surgery("squeezenet1_0", 64, "classifier.1", ("features.12.*",), "features.11", "classifier.0", conv_head=True),
    Surgery("googlenet", 64, "fc", ("inception5b.*",), "inception5a", "dropout",
            kwargs={"aux_logits": False, "init_weights": True}),
    # 75x75 is the smallest input inception_v3's stem accepts
    Surgery("inception_v3", 75, "fc", ("Mixed_7c.*",), "Mixed_7b", "dropout",
            kwargs={"aux_logits": False, "init_weights": True}),
    # the classifier is vgg's and alexnet's last trainable stage (most of their weights)
    Surgery("vgg16", 64, "classifier.6", ("classifier.*",), "avgpool", "classifier.2", heavy=True),
    Surgery("alexnet", 64, "classifier.6", ("classifier.*",), "avgpool", "classifier.0"),
]

BY_NAME = {s.name: s for s in MODELS}


def build(surgery: Surgery) -> tuple[nn.Module, tuple]:
    """The model (seeded, eval, random weights) and one example input."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(surgery.name, weights=None, **surgery.kwargs).eval()
    x = torch.randn(1, 3, surgery.size, surgery.size, generator=torch.Generator().manual_seed(0))
    return model, (x,)


def six_rules(surgery: Surgery) -> list:
    """Head swap, freeze all but the last stage, detach cut, dropout insert, ReLU->GELU, one delete."""
    head = (fxs.new(nn.Conv2d, out_channels=10, kernel_size=1) if surgery.conv_head
            else fxs.new(nn.Linear, out_features=10))
    return [
        Replace(surgery.head, head),
        Freeze("*", exclude=[*surgery.keep, surgery.head]),
        Detach(after=surgery.cut),
        Insert(nn.Dropout(0.2), before=surgery.head),
        Replace(nn.ReLU, nn.GELU(), optional=True),  # several models have no nn.ReLU
        Delete(surgery.delete),
    ]


def selected(quick: bool, names: list[str] | None = None) -> list[Surgery]:
    if names:
        return [BY_NAME[n] for n in names]
    return [s for s in MODELS if not (quick and s.heavy)]
