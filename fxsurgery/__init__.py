"""fxsurgery: model surgery for PyTorch as checked graph rewrites.

    import fxsurgery as fxs
    from fxsurgery import Delete, Replace, Insert, Detach, Freeze

    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10)),
                               Freeze("*", exclude=["layer4.*", "fc"])],
                       example_inputs=(torch.randn(1, 3, 224, 224),))
    result.module, result.report, result.save("out/"), fxs.load("out/")
"""

from .checkpoint import Checkpoint, empty_weights
from .errors import (FxsError, MatchError, ModelError, RewriteError, RuleError, SaveError,
                     TraceError, TransferError, ValidateError)
from .loader import load_rules
from .pipeline import SurgeryResult, SurgeryWarning, apply
from .replay import map_weights
from .export import load, save
from .spec import Delete, Detach, Freeze, Insert, Replace, RuleSet, new
from .pattern import Chain, Output, Pattern, Rewrite, calls, pattern
from .library import (AddLoRA, AdaptInputChannels, DropDropout, FoldBatchNorm, FoldLinearBatchNorm,
                      SwapActivation)
from .weights import TransferReport
from .pairwise import transfer_modules as transfer
from .version import __version__

__all__ = [
    "apply", "new", "load_rules", "transfer", "save", "load", "map_weights", "empty_weights", "Checkpoint",
    "Delete", "Replace", "Insert", "Detach", "Freeze", "RuleSet",
    "Rewrite", "Output", "Pattern", "pattern", "calls", "Chain",
    "FoldBatchNorm", "FoldLinearBatchNorm", "DropDropout", "SwapActivation", "AddLoRA", "AdaptInputChannels",
    "SurgeryResult", "TransferReport", "SurgeryWarning",
    "FxsError", "RuleError", "ModelError", "TraceError", "MatchError", "RewriteError",
    "ValidateError", "TransferError", "SaveError", "__version__",
]
