"""Export: a result leaves as files and comes back.

`save` writes model.py + model.safetensors + surgery.json atomically (and,
on request, pt2 / ONNX / TorchScript, each verified); `load` rebuilds the
module; `map_weights` replays a saved surgery's weight mapping on another
checkpoint of the original architecture.
"""

from ._atomic import check_target
from ._load import load
from ._ranks import Ranks
from ._record import read_record
from ._replay import map_weights, write_mapped
from ._save import check_save, save, save_pretrained
from ._shards import footprint, parse_size

__all__ = [
    "Ranks", "check_save", "check_target", "footprint", "load", "map_weights", "parse_size", "read_record", "save", "save_pretrained", "write_mapped",
]
