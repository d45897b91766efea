"""ddeseg: audio-visual segmentation with DDESeg, from raw datasets to evaluated models.

`ddeseg.load(checkpoint)` gives a `Segmenter` (`ddeseg.api`): `.segment(frames, audio,
sample_rate)` and `.segment_video(path)`. Imported on first use, so that `import ddeseg` (and
the command line's start) stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmentation", "Segmenter", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Segmenter", "Segmentation"):
        from ddeseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'ddeseg' has no attribute {name!r}")
