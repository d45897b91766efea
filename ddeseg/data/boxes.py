"""Sounding-object boxes from class-id masks (`meta.json`'s `union_box` / `class_boxes`, and the
boxes `predict` reports).

A box is `[x0, y0, x1, y1]` normalised by the mask's width and height, in the official DDESeg
convention (`avss_bbox_orisize.json`; the example in its `data_augmentation.py` is
`[0.0, 0.0, 0.75625, 0.99861]` = row 719 of a 720-row frame): a region spanning columns `c0..c1`
and rows `r0..r1` (inclusive) has `x0 = c0 / W, x1 = c1 / W` (likewise y). `round(x * W)` gives
back the pixel index; the official crop slices `[int(x0 * W):int(x1 * W)]`.
Sounding pixels are those that are neither background (0) nor `IGNORE_INDEX`.
An empty mask (or a frame without annotation) has no box (`None`).
"""

from __future__ import annotations

import numpy as np

from ddeseg.data.schema import IGNORE_INDEX

Box = list[float]


def box_of(region: np.ndarray) -> Box | None:
    """Normalised box (inclusive pixel indices / size) of the True pixels of a bool `[H, W]`
    array; None when empty."""
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(region.any(axis=0))
    height, width = region.shape
    return [
        float(columns[0]) / width,
        float(rows[0]) / height,
        float(columns[-1]) / width,
        float(rows[-1]) / height,
    ]


def sounding_boxes(mask: np.ndarray | None) -> tuple[list[int], Box | None, dict[str, Box]]:
    """Classes present, union box and per-class boxes of a uint8 `[H, W]` class-id mask.

    Returns `(classes, union_box, class_boxes)`: sorted class ids other than background and
    ignore; the box of all sounding pixels (None when there are none); `{str(class id): box}`.
    """
    if mask is None:
        return [], None, {}
    present = np.unique(mask)
    classes = [int(c) for c in present if c != 0 and c != IGNORE_INDEX]
    if not classes:
        return [], None, {}
    union_box = box_of((mask != 0) & (mask != IGNORE_INDEX))
    class_boxes = {str(c): box_of(mask == c) for c in classes}
    return classes, union_box, class_boxes  # type: ignore[return-value]
