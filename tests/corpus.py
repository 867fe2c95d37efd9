"""The capture corpus: 42 real models to trace, rewrite and compare.

Every model is built from its constructor (torchvision, timm) or from a small
config (transformers) with random weights, seeded with ``torch.manual_seed(0)``
and put in eval mode; nothing is ever downloaded.  Importing this module is
cheap: torchvision, timm and transformers are imported inside the builders.

Each entry is a :class:`Case`; ``model(*case.inputs())`` runs the model, and
``case.output(result)`` gives the tensor (or flat tuple of tensors) to compare
between two runs or between the original and a rewritten model.  Two forward
passes of every case give bit-identical outputs on CPU.

``slow=True`` marks the heaviest models (seconds per forward pass on a couple
of CPU cores); the rest make the quick subset.  ``activations`` is data, taken
from the built models (``python tests/probe_corpus.py --all`` checks it).

This file is data for tests and scripts; it is not a test module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# The activation modules a case's ``activations`` field may name.
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish)

FAMILIES = (
    "torchvision-detection",
    "torchvision-segmentation",
    "torchvision-video",
    "torchvision-flow",
    "timm",
    "transformers",
)


@dataclass(frozen=True)
class Case:
    name: str  # unique: "tv/...", "timm/...", "hf/..."
    family: str  # one of FAMILIES
    build: Callable[[], nn.Module]  # seeded, eval mode, random weights
    inputs: Callable[[], tuple]  # seeded; call as model(*inputs())
    head: str | None  # module path of the classifier to swap, if there is an obvious one
    num_classes: int | None  # out features / channels of ``head``
    activations: tuple[str, ...]  # names of the ACTIVATIONS classes among the modules
    slow: bool  # left out of the quick subset
    output: Callable[[Any], Tensor | tuple[Tensor, ...]]  # model output -> tensors to compare
    note: str = ""  # anything a user of the case should know


def activation_names(model: nn.Module) -> tuple[str, ...]:
    """The ACTIVATIONS classes that modules of ``model`` are instances of, in ACTIVATIONS order.

    Subclasses count as their base class; functional calls (F.gelu) and other
    libraries' activation classes (transformers' GELUActivation) do not.
    """
    found = {cls.__name__ for m in model.modules() for cls in ACTIVATIONS if isinstance(m, cls)}
    return tuple(cls.__name__ for cls in ACTIVATIONS if cls.__name__ in found)


# ---------------------------------------------------------------------------
# Building blocks


def _seeded_build(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()

    return build


def _rand(*shape: int, seed: int = 0) -> Tensor:
    """Uniform [0, 1) values, as an image; seeded without touching the global generator."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _token_ids(seed: int = 0) -> Tensor:
    """[1, 8] int64 ids below the corpus vocabulary size (1000)."""
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(seed))


def _flat_detections(out: list[dict[str, Tensor]]) -> tuple[Tensor, ...]:
    """torchvision detection output (a list of dicts, one per image) as a flat tuple.

    Keys are taken in sorted order, so e.g. (boxes, labels, scores) per image.
    """
    return tuple(d[k] for d in out for k in sorted(d))


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision.models import get_model

        return get_model(name, weights=None, **kwargs)

    return _seeded_build(make)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return _seeded_build(make)


# Small transformers configs: hidden size 64, 2 layers, 4 heads, vocabulary
# 1000, feed-forward 128.  Eager attention, so the traced graph holds plain
# matmul/softmax rather than whichever SDPA kernel is picked at run time.  The
# decoders get use_cache=False: their output is then logits only, with no
# key/value cache objects to carry through a trace.
VOCAB = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
FFN = 128


def _hf(model_class: str, config_class: str, **config: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_class)(attn_implementation="eager", **config)
        return getattr(transformers, model_class)(cfg)

    return _seeded_build(make)


def _image(size: int, seed: int = 0) -> Callable[[], tuple]:
    return lambda: (_randn(1, 3, size, size, seed=seed),)


def _logits(out: Any) -> Tensor:
    return out.logits


def _last_hidden_state(out: Any) -> Tensor:
    return out.last_hidden_state


def _same(out: Tensor) -> Tensor:
    return out


# ---------------------------------------------------------------------------
# torchvision detection: one 3x224x224 image in a list.  The models resize it
# to their own min_size (800, or 320 for SSDlite) internally.  Faster R-CNN
# MobileNet (3-4 s a pass) is the one two-stage detector in the quick subset.


def _detection_inputs() -> tuple:
    return ([_rand(3, 224, 224)],)


# With random weights (seed 0) Faster R-CNN MobileNet, RetinaNet and FCOS
# score every box below their default threshold of 0.05 and return no box at
# all, so their output would compare empty tensors.  For those three the
# threshold is 0.0: they keep their top detections_per_img boxes, which is
# still deterministic on CPU.  Mask R-CNN (100 boxes), Keypoint R-CNN (11) and
# SSDlite (300, threshold 0.001) already return boxes with their defaults.
_DETECTION = [
    Case(
        name="tv/fasterrcnn_mobilenet_v3_large_fpn",
        family="torchvision-detection",
        build=_tv("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None, box_score_thresh=0.0),
        inputs=_detection_inputs,
        head="roi_heads.box_predictor.cls_score",
        num_classes=91,
        activations=("ReLU", "Hardswish"),
        slow=False,
        output=_flat_detections,
    ),
    Case(
        name="tv/maskrcnn_resnet50_fpn",
        family="torchvision-detection",
        build=_tv("maskrcnn_resnet50_fpn", weights_backbone=None),
        inputs=_detection_inputs,
        head="roi_heads.box_predictor.cls_score",
        num_classes=91,
        activations=("ReLU",),
        slow=True,
        output=_flat_detections,
        note="also roi_heads.mask_predictor.mask_fcn_logits (91 channels)",
    ),
    Case(
        name="tv/retinanet_resnet50_fpn",
        family="torchvision-detection",
        build=_tv("retinanet_resnet50_fpn", weights_backbone=None, score_thresh=0.0),
        inputs=_detection_inputs,
        head="head.classification_head.cls_logits",
        num_classes=819,
        activations=("ReLU",),
        slow=True,
        output=_flat_detections,
        note="head is a Conv2d with 9 anchors x 91 classes = 819 channels",
    ),
    Case(
        name="tv/ssdlite320_mobilenet_v3_large",
        family="torchvision-detection",
        build=_tv("ssdlite320_mobilenet_v3_large", weights_backbone=None),
        inputs=_detection_inputs,
        head=None,
        num_classes=None,
        activations=("ReLU", "Hardswish"),
        slow=False,
        output=_flat_detections,
        note="classification head is six per-level convs (head.classification_head.module_list)",
    ),
    Case(
        name="tv/fcos_resnet50_fpn",
        family="torchvision-detection",
        build=_tv("fcos_resnet50_fpn", weights_backbone=None, score_thresh=0.0),
        inputs=_detection_inputs,
        head="head.classification_head.cls_logits",
        num_classes=91,
        activations=("ReLU",),
        slow=True,
        output=_flat_detections,
    ),
    Case(
        name="tv/keypointrcnn_resnet50_fpn",
        family="torchvision-detection",
        build=_tv("keypointrcnn_resnet50_fpn", weights_backbone=None),
        inputs=_detection_inputs,
        head="roi_heads.box_predictor.cls_score",
        num_classes=2,
        activations=("ReLU",),
        slow=True,
        output=_flat_detections,
        note="also roi_heads.keypoint_predictor.kps_score_lowres (17 keypoints)",
    ),
]

# ---------------------------------------------------------------------------
# torchvision segmentation, video and optical flow

_SEGMENTATION = [
    Case(
        name="tv/deeplabv3_mobilenet_v3_large",
        family="torchvision-segmentation",
        build=_tv("deeplabv3_mobilenet_v3_large", weights_backbone=None),
        inputs=_image(128),
        head="classifier.4",
        num_classes=21,
        activations=("ReLU", "Hardswish"),
        slow=False,
        output=lambda out: out["out"],
        note="aux_loss is off (weights=None), so the output dict holds 'out' only",
    ),
    Case(
        name="tv/fcn_resnet50",
        family="torchvision-segmentation",
        build=_tv("fcn_resnet50", weights_backbone=None),
        inputs=_image(128),
        head="classifier.4",
        num_classes=21,
        activations=("ReLU",),
        slow=False,
        output=lambda out: out["out"],
    ),
    Case(
        name="tv/lraspp_mobilenet_v3_large",
        family="torchvision-segmentation",
        build=_tv("lraspp_mobilenet_v3_large", weights_backbone=None),
        inputs=_image(128),
        head="classifier.high_classifier",
        num_classes=21,
        activations=("ReLU", "Hardswish"),
        slow=False,
        output=lambda out: out["out"],
        note="the logits are the sum of classifier.high_classifier and classifier.low_classifier",
    ),
]

_VIDEO = [
    Case(
        name="tv/r3d_18",
        family="torchvision-video",
        build=_tv("r3d_18"),
        inputs=lambda: (_randn(1, 3, 8, 112, 112),),
        head="fc",
        num_classes=400,
        activations=("ReLU",),
        slow=False,
        output=_same,
    ),
    Case(
        name="tv/mvit_v1_b",
        family="torchvision-video",
        build=_tv("mvit_v1_b"),
        # MViT's positional embeddings fix the clip size to 16x224x224 (the
        # default spatial_size and temporal_size); other sizes fail.
        inputs=lambda: (_randn(1, 3, 16, 224, 224),),
        head="head.1",
        num_classes=400,
        activations=("GELU",),
        slow=True,
        output=_same,
    ),
    Case(
        name="tv/s3d",
        family="torchvision-video",
        build=_tv("s3d"),
        # S3D ends in a fixed (2, 7, 7) average pool, larger than the feature
        # map of an 8x112x112 clip; 16x224x224 is its pretrained clip size.
        inputs=lambda: (_randn(1, 3, 16, 224, 224),),
        head="classifier.1",
        num_classes=400,
        activations=("ReLU",),
        slow=False,
        output=_same,
        note="head is a 1x1x1 Conv3d",
    ),
    Case(
        name="tv/swin3d_t",
        family="torchvision-video",
        build=_tv("swin3d_t"),
        inputs=lambda: (_randn(1, 3, 8, 112, 112),),
        head="head",
        num_classes=400,
        activations=("GELU",),
        slow=False,
        output=_same,
    ),
]

_FLOW = [
    Case(
        name="tv/raft_small",
        family="torchvision-flow",
        build=_tv("raft_small"),
        inputs=lambda: (_rand(1, 3, 128, 128, seed=0), _rand(1, 3, 128, 128, seed=1)),
        head=None,
        num_classes=None,
        activations=("ReLU",),
        slow=False,
        # RAFT returns the flow after each of its 12 refinement steps; the last is the estimate.
        output=lambda out: out[-1],
        note="output is a list of 12 flow estimates [1, 2, 128, 128]; the last is compared",
    ),
]

# ---------------------------------------------------------------------------
# timm: default input size from each model's pretrained_cfg, batch 1; every
# head is a 1000-way Linear.


def _timm_case(
    name: str,
    size: int,
    head: str,
    activations: tuple[str, ...],
    *,
    slow: bool = False,
    note: str = "",
    **kwargs: Any,
) -> Case:
    return Case(
        name=f"timm/{name}",
        family="timm",
        build=_timm(name, **kwargs),
        inputs=_image(size),
        head=head,
        num_classes=1000,
        activations=activations,
        slow=slow,
        output=_same,
        note=note,
    )


_TIMM = [
    _timm_case("resnet50", 224, "fc", ("ReLU",)),
    _timm_case("vit_small_patch16_224", 224, "head", ("GELU",)),
    _timm_case(
        "convnext_tiny", 224, "head.fc", (),
        note="its GELU is timm.layers.activations.GELU, not a subclass of nn.GELU",
    ),
    _timm_case("efficientnet_b0", 224, "classifier", ("SiLU",)),
    _timm_case("swin_tiny_patch4_window7_224", 224, "head.fc", ("GELU",)),
    _timm_case("deit_small_patch16_224", 224, "head", ("GELU",)),
    _timm_case("mobilevitv2_050", 256, "head.fc", ("SiLU",)),
    _timm_case(
        "levit_128", 224, "head.linear", ("Hardswish",),
        note="distilled: the output averages head.linear and head_dist.linear in eval mode",
    ),
    _timm_case("regnety_002", 224, "head.fc", ("ReLU",)),
    _timm_case("beit_base_patch16_224", 224, "head", ("GELU",), slow=True),
    _timm_case("coat_lite_tiny", 224, "head", ("GELU",)),
    _timm_case(
        "crossvit_9_240", 240, "head.0", ("GELU",),
        note="two branches: the output averages head.0 and head.1",
    ),
    # The eva02_tiny pretrained config is a headless (num_classes=0) MIM
    # checkpoint; ask for a 1000-class head so the case has a classifier.
    _timm_case("eva02_tiny_patch14_224", 224, "head", ("SiLU",), num_classes=1000),
    _timm_case("mixer_b16_224", 224, "head", ("GELU",), slow=True),
    _timm_case("poolformer_s12", 224, "head.fc", ("GELU",)),
    _timm_case("tresnet_m", 224, "head.fc", ("ReLU",), note="also has nn.LeakyReLU"),
    _timm_case("xcit_tiny_12_p16_224", 224, "head", ("GELU",)),
    _timm_case("fastvit_t8", 256, "head.fc", ("ReLU", "GELU")),
    _timm_case(
        "efficientformer_l1", 224, "head", ("ReLU", "GELU"),
        note="distilled: the output averages head and head_dist in eval mode",
    ),
    _timm_case("nfnet_l0", 224, "head.fc", ("ReLU", "SiLU")),
]

# ---------------------------------------------------------------------------
# transformers, from small configs.  Text inputs are [1, 8] int64 ids; no
# attention mask (all-ones is the default).


def _hf_case(
    name: str,
    build: Callable[[], nn.Module],
    inputs: Callable[[], tuple],
    output: Callable[[Any], Tensor],
    head: str | None = None,
    num_classes: int | None = None,
    *,
    activations: tuple[str, ...] = (),
    note: str = "",
) -> Case:
    return Case(
        name=f"hf/{name}",
        family="transformers",
        build=build,
        inputs=inputs,
        head=head,
        num_classes=num_classes,
        activations=activations,
        slow=False,
        output=output,
        note=note,
    )


def _text_inputs() -> tuple:
    return (_token_ids(),)


_TRANSFORMERS = [
    _hf_case(
        "bert",
        _hf("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            max_position_embeddings=64),
        _text_inputs, _last_hidden_state,
    ),
    _hf_case(
        "gpt2",
        _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
            n_head=HEADS, n_inner=FFN, n_positions=64, bos_token_id=1, eos_token_id=2,
            use_cache=False),
        _text_inputs, _logits, "lm_head", VOCAB,
        note="lm_head shares its weight with transformer.wte",
    ),
    _hf_case(
        "llama",
        _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            use_cache=False),
        _text_inputs, _logits, "lm_head", VOCAB,
    ),
    _hf_case(
        "t5",
        _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=HIDDEN,
            d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_heads=HEADS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            use_cache=False),
        # forward(input_ids, attention_mask, decoder_input_ids, ...): positional,
        # with None for the attention mask.
        lambda: (_token_ids(seed=0), None, _token_ids(seed=1)),
        _logits, "lm_head", VOCAB, activations=("ReLU",),
        note="inputs are (input_ids, None, decoder_input_ids): the None fills attention_mask",
    ),
    _hf_case(
        "vit",
        _hf("ViTForImageClassification", "ViTConfig", hidden_size=HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            image_size=32, patch_size=8, num_labels=10),
        _image(32), _logits, "classifier", 10,
    ),
    _hf_case(
        "distilbert",
        _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN,
            n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=64),
        _text_inputs, _last_hidden_state,
    ),
    _hf_case(
        "clip_vision",
        _hf("CLIPVisionModel", "CLIPVisionConfig", hidden_size=HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            image_size=32, patch_size=8),
        _image(32), _last_hidden_state,
    ),
    _hf_case(
        "whisper",
        # The encoder wants exactly 2 * max_source_positions input frames
        # (two convs, the second with stride 2): [1, 16 mel bins, 64 frames].
        _hf("WhisperModel", "WhisperConfig", vocab_size=VOCAB, d_model=HIDDEN,
            encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
            num_mel_bins=16, max_source_positions=32, max_target_positions=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
            begin_suppress_tokens=None, suppress_tokens=None, use_cache=False),
        # forward(input_features, attention_mask, decoder_input_ids, ...).
        lambda: (_randn(1, 16, 64), None, _token_ids(seed=1)),
        _last_hidden_state,
        note="inputs are (input_features, None, decoder_input_ids): the None fills attention_mask; "
        "output is the decoder's last_hidden_state",
    ),
]

CORPUS: list[Case] = _DETECTION + _SEGMENTATION + _VIDEO + _FLOW + _TIMM + _TRANSFORMERS

BY_NAME: dict[str, Case] = {case.name: case for case in CORPUS}
assert len(BY_NAME) == len(CORPUS), "case names must be unique"
