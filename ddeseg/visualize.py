"""Pictures of predictions: the official colour palette, mask overlays, triptychs and contact sheets.

Colours: the VOC-style palette that AVSBench builds for its 71 AVSS classes and that the official
DDESeg visualisation also uses for AVSS (AVSBench @ f7414af, `avs_scripts/avss/color_dataloader.py
::get_v2_pallete`; DDESeg @ 75a8471, `util_tools/colors.py::get_v2_pallete`). Class id j gets,
for its bits taken three at a time from the lowest, bit 0 / 1 / 2 of each triple in R / G / B at
positions 7, 6, 5, ... (from the top): 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0),
4 (0, 0, 128), ... Masks are coloured by the *task's* class id, as the official code does: for v2
that is the AVSS id, for the binary tasks (v1s, v1m) foreground 1 is (128, 0, 0). (DDESeg draws
VPO masks with a palette of its own; we keep this one for every task.)

Overlays blend the class colour over the image only where a class is (40 % colour, 60 % image,
the official `Image.blend(mask, image, alpha=0.6)` weights) and leave background pixels as they
are, so the picture stays readable; `IGNORE_INDEX` pixels are blended with white.

Pictures of one frame are three square panels side by side, `image | ground truth | prediction`,
each `S x S` at the model's input size, so a picture is `3S x S` pixels. The contact sheet puts
such rows in a grid of `columns`, each under a caption strip of `CAPTION_PX` pixels; its size is
`sheet_size(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddeseg.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ddeseg.data.schema import IGNORE_INDEX

OVERLAY_ALPHA = 0.4  # weight of the class colour (the official blend keeps 0.6 of the image)
IGNORE_COLOR = (255, 255, 255)
CAPTION_PX = 14  # height of the text strip above each contact-sheet cell
SEPARATOR_PX = 2  # gap between contact-sheet cells


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """uint8 `[num_classes, 3]`: the AVSBench / DDESeg (VOC-style) colour of every class id."""
    ids = np.arange(num_classes, dtype=np.int64)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    label = ids.copy()
    shift = 7
    while bool((label > 0).any()):
        for channel in range(3):
            palette[:, channel] |= ((label >> channel) & 1) << shift
        label >>= 3
        shift -= 1
    return palette.astype(np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Class ids `[H, W]` -> uint8 RGB `[H, W, 3]` in the palette (`IGNORE_INDEX` white)."""
    palette = voc_palette() if palette is None else palette
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(256, len(palette))] = palette[:256]
    table[IGNORE_INDEX] = IGNORE_COLOR
    return table[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray | None = None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the colours of `mask` (class ids `[H, W]`) over `image` (uint8 `[H, W, 3]`).

    Background (0) pixels keep the image; every other pixel is `(1 - alpha) image + alpha colour`.
    Returns uint8 `[H, W, 3]`.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    colours = colorize(mask, palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    out = np.where((np.asarray(mask) != 0)[..., None], np.rint(blended), image.astype(np.float32))
    return out.astype(np.uint8)


def denormalize_images(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised float `[B, 3, H, W]` (the loader's `image`) -> uint8 `[B, H, W, 3]`."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).mul(255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class FramePicture:
    """What a picture of one frame needs: all at the model's input size `S`."""

    key: str
    image: np.ndarray  # uint8 [S, S, 3]
    target: np.ndarray  # uint8 [S, S] task class ids (IGNORE_INDEX kept)
    prediction: np.ndarray  # uint8 [S, S] predicted task class ids
    score: float  # the frame's mean IoU (see `SegmentationMeter.update`); NaN if undefined


def triptych(frame: FramePicture, palette: np.ndarray | None = None) -> np.ndarray:
    """uint8 `[S, 3S, 3]`: image | ground-truth overlay | prediction overlay."""
    return np.concatenate(
        [frame.image, overlay(frame.image, frame.target, palette), overlay(frame.image, frame.prediction, palette)],
        axis=1,
    )


def picture_name(index: int, key: str) -> str:
    """File name of the `index`-th sample picture (keys are already file-name safe)."""
    return f"sample-{index:03d}-{key}.png"


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write uint8 RGB `[H, W, 3]` as PNG (deterministic bytes), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB").save(path, format="PNG", optimize=False, compress_level=6)
    return path


def sheet_size(count: int, image_size: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of `count` frames of `image_size` px."""
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    cell_w, cell_h = 3 * image_size, image_size + CAPTION_PX
    return columns * cell_w + (columns - 1) * SEPARATOR_PX, rows * cell_h + (rows - 1) * SEPARATOR_PX


def contact_sheet(frames: Sequence[FramePicture], columns: int = 2, palette: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB grid of `triptych`s (row-major, in the given order), each under a caption
    `rank. IoU x.xxx  key` (cut at the cell's width). Size: `sheet_size(len(frames), S, columns)`."""
    if not frames:
        raise ValueError("a contact sheet needs at least one frame")
    size = frames[0].image.shape[0]
    width, height = sheet_size(len(frames), size, columns)
    columns = max(1, min(columns, len(frames)))
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    for index, frame in enumerate(frames):
        if frame.image.shape[:2] != (size, size):
            raise ValueError(f"frame {frame.key}: image {frame.image.shape[:2]}, others are {size} px")
        row, column = divmod(index, columns)
        x = column * (3 * size + SEPARATOR_PX)
        y = row * (size + CAPTION_PX + SEPARATOR_PX)
        score = "n/a" if not np.isfinite(frame.score) else f"{frame.score:.3f}"
        caption = Image.new("RGB", (3 * size, CAPTION_PX), (32, 32, 32))  # clips a long caption to its cell
        ImageDraw.Draw(caption).text((2, 1), f"{index + 1}. IoU {score}  {frame.key}", fill=(240, 240, 240))
        sheet.paste(caption, (x, y))
        sheet.paste(Image.fromarray(triptych(frame, palette)), (x, y + CAPTION_PX))
    return np.asarray(sheet)
