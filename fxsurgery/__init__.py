"""fxsurgery: model surgery for PyTorch as checked graph rewrites.

    import fxsurgery as fxs
    from fxsurgery import Delete, Replace, Insert, Detach, Freeze, Layers

    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10)),
                               Freeze("*", exclude=["layer4.*", "fc"])],
                       example_inputs=(torch.randn(1, 3, 224, 224),))
    result.module, result.report, result.save("out/"), fxs.load("out/")
"""

from .errors import FxsError, MatchError, ModeError, ModelError, RewriteError, RuleError, SaveError, TraceError, TransferError, ValidateError
from .export import load, map_weights, save
from .pipeline import SurgeryResult, SurgeryWarning, apply
from .spec import (
    AdaptInputChannels,
    AddLoRA,
    Chain,
    Delete,
    Detach,
    DropDropout,
    FoldBatchNorm,
    FoldLinearBatchNorm,
    Freeze,
    Insert,
    Layers,
    Output,
    Pattern,
    Prune,
    Replace,
    Rewrite,
    RuleSet,
    SwapActivation,
    calls,
    load_rules,
    new,
    pattern,
)
from .transfer import Checkpoint, TransferReport, empty_weights
from .transfer import transfer_modules as transfer
from .version import __version__
from .views import diff

__all__ = [
    "apply", "new", "load_rules", "transfer", "save", "load", "map_weights", "diff", "empty_weights", "Checkpoint",
    "Delete", "Replace", "Insert", "Detach", "Freeze", "Layers", "Prune", "RuleSet",
    "Rewrite", "Output", "Pattern", "pattern", "calls", "Chain",
    "FoldBatchNorm", "FoldLinearBatchNorm", "DropDropout", "SwapActivation", "AddLoRA", "AdaptInputChannels",
    "SurgeryResult", "TransferReport", "SurgeryWarning",
    "FxsError", "RuleError", "ModelError", "ModeError", "TraceError", "MatchError", "RewriteError",
    "ValidateError", "TransferError", "SaveError", "__version__",
]

# The API is fxsurgery.NAME wherever it is defined: reprs, error messages and
# pickles name the public path, not the engine module behind it.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        _obj.__module__ = __name__
del _name, _obj
