"""ddeseg: audio-visual segmentation with DDESeg, from raw datasets to evaluated models."""

__version__ = "0.1.0"
