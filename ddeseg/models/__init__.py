"""The DDESeg model: `build_model(model_cfg)` and `load_checkpoint(model, path)`.

Modules: `frontend` (log-mel, shared with the data pipeline), `htsat` (audio backbone),
`enhancer` (dynamic derivation), `aligner` (dynamic elimination), `mit_aligned` (visual
backbone), `head` (SegFormer decoders), `ddeseg` (assembly), `checkpoint` (loading).
"""

from ddeseg.models.ddeseg import DDESeg, build_model
from ddeseg.models.frontend import LogMelFrontend, frames_for, spec_augment
from ddeseg.models.weights import LoadReport, load_checkpoint

__all__ = ["DDESeg", "LoadReport", "LogMelFrontend", "build_model", "frames_for", "load_checkpoint", "spec_augment"]
