"""Pictures of predictions: the colour palettes, mask overlays, the evaluation pictures (one
frame, one frame under the three audio conditions, one video) and `ddeseg predict`'s overlay with a
legend. One drawing code path: the palette, the fill, the outlines and the legend swatches of every
picture come from here.

Which colours (`ddeseg.classes.display_palette`): masks of AVSBench-semantic classes at their
official ids (v2 on AVSS data) are drawn in the official palette below, so that pictures compare
with the papers'; every other class list (the demo's synthetic classes, VPO, the binary
foreground) in `ddeseg.classes.READABLE_COLOURS`, colours far apart from each other and from
black. Some official colours are dark ((64, 0, 0) for id 8) or close to an object's own colour, so
every class region also gets a two-ring outline: white outside, the class colour at full strength
inside; it reads over dark and light images alike, and the legend swatches have the same white
border on the legend's neutral grey.

The official palette: the VOC-style palette that AVSBench builds for its 71 AVSS classes and that the official
DDESeg visualisation also uses for AVSS (AVSBench @ f7414af, `avs_scripts/avss/color_dataloader.py
::get_v2_pallete`; DDESeg @ 75a8471, `util_tools/colors.py::get_v2_pallete`). Class id j gets,
for its bits taken three at a time from the lowest, bit 0 / 1 / 2 of each triple in R / G / B at
positions 7, 6, 5, ... (from the top): 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0),
4 (0, 0, 128), ... Masks are coloured by the *task's* class id, as the official code does: for v2
that is the AVSS id, for the binary tasks (v1s, v1m) foreground 1 is (128, 0, 0). (DDESeg draws
VPO masks with a palette of its own; we keep this one for every task.)

`overlay` blends the class colour over the image only where a class is and leaves background
pixels as they are; its default weights are the official `Image.blend(mask, image, alpha=0.6)`
ones (40 % colour). The pictures meant to be looked at (`frame_picture`, `controls_picture`,
`video_strip`, `overlay_with_legend`) use `OVERLAY_ALPHA` (55 % colour) and the two-ring outline
(`outlined_overlay`), so that ground truth and prediction stand out from the image.
`IGNORE_INDEX` pixels are blended with white.

Audio conditions are named as the reports name them (`audio_label`): `normal` (the frame's own
second; the config value `none`, i.e. no control), `shuffled`, `silent`.

An evaluation picture of one frame (`frame_picture`, layout in `frame_layout`): a title bar (rank,
sample key, frame IoU, audio condition); three square panels `image | ground truth | prediction`,
each `panel_size(S)` = max(192, S) pixels (the model-size inputs upscaled: bicubic for the image,
nearest neighbour for the masks); under the mask panels the classes present with their colour and
pixel share; at the bottom the log-mel the model was given (time left to right, low mel bins at
the bottom) with the classes that sound in the frame according to the ground truth. Its size
depends only on S. `controls_picture` puts one frame's predictions under the three audio
conditions side by side (`image | ground truth | normal | shuffled | silent`), each prediction
with its IoU, its legend and, beneath, the log-mel it was given. `video_strip` draws the frames of one video left to right, ground truth and
prediction rows, with their seconds of audio side by side beneath.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddeseg.classes import avss_palette, display_palette
from ddeseg.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ddeseg.data.schema import IGNORE_INDEX

OFFICIAL_ALPHA = 0.4  # `overlay`'s default: the official blend keeps 0.6 of the image
# Pictures for people: a stronger fill than the official blend and a white outline, so that a dark
# palette colour over a similar object is still seen and ground truth differs from the image.
OVERLAY_ALPHA = 0.55
OUTLINE_COLOR = (255, 255, 255)  # the outer ring of every class region (the inner: the class colour)
IGNORE_COLOR = (255, 255, 255)
CAPTION_PX = 14  # height of the rank caption of `triptych` contact sheets (kept for old callers)
SEPARATOR_PX = 2  # gap between contact-sheet cells
# Short side of every panel of an evaluation picture: 3 panels fit a column of a 2-wide grid of the
# HTML report (a 1240 px page) at their own size, so the text in them is never scaled down.
PANEL_MIN_PX = 192
STRIP_CELL_PX = 192  # side of one frame in a video strip
GAP_PX = 4  # between panels
FONT_PX = 14
LINE_PX = 18
TITLE_PX = 24
INFO_LINES = 6  # text lines under the panels: a header and up to 5 classes
AUDIO_HEADER_PX = 20
AUDIO_STRIP_PX = 96
# The log-mel strip's colour scale, in the front end's dB (floor -100 dB, loud sounds ~ +10..20 dB):
# fixed, not per picture, so that a quiet second looks quiet next to a loud one.
LOGMEL_DB_RANGE = (-100.0, 20.0)
BACKGROUND = (32, 32, 32)
SWATCH_CHIP = (96, 96, 96)  # neutral grey behind a legend swatch: dark colours show against it
TEXT = (240, 240, 240)
DIM_TEXT = (170, 170, 170)


def colorize(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Class ids `[H, W]` -> uint8 RGB `[H, W, 3]` in the palette (`IGNORE_INDEX` white)."""
    palette = avss_palette() if palette is None else palette
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(256, len(palette))] = palette[:256]
    table[IGNORE_INDEX] = IGNORE_COLOR
    return table[np.asarray(mask, dtype=np.uint8)]


def class_colour(class_id: int, palette: np.ndarray | None = None) -> tuple[int, int, int]:
    """RGB of one class id, as `colorize` paints it."""
    r, g, b = colorize(np.array([[class_id]], dtype=np.uint8), palette)[0, 0]
    return int(r), int(g), int(b)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray | None = None, alpha: float = OFFICIAL_ALPHA) -> np.ndarray:
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


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool `[H, W]`: the pixels of a class region (not background) that touch another label,
    thickened to about H / 240 pixels so that outlines stay visible on large frames."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    return _grown(edge, outline_width(mask) - 1) & (mask != 0)


def outline_width(mask: np.ndarray) -> int:
    """Width in pixels of each ring of the outline: about H / 240, at least 2 (a 1 px ring of the
    class colour is not seen at the size a report shows a panel)."""
    return max(2, mask.shape[0] // 240)


def _grown(region: np.ndarray, steps: int) -> np.ndarray:
    """`region` (bool) dilated `steps` times by its four neighbours."""
    for _ in range(max(0, steps)):
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        region = grown
    return region


def outlined_overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """`overlay` at `OVERLAY_ALPHA`, every class region outlined by two rings: `OUTLINE_COLOR`
    outside, the class's own colour at full strength inside (`outline_width` pixels each)."""
    picture = overlay(image, mask, palette, alpha=OVERLAY_ALPHA)
    outer = mask_outline(mask)
    inner = _grown(outer, outline_width(mask)) & ~outer & (mask != 0)
    picture[inner] = colorize(mask, palette)[inner]
    picture[outer] = OUTLINE_COLOR
    return picture


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend_font_px(height: int) -> int:
    """Font size of `overlay_with_legend`'s panel for a frame `height` pixels high."""
    return max(10, round(height / 32))


class LegendFrame(Protocol):
    """What `overlay_with_legend` reads (`ddeseg.segment.FramePrediction` is one)."""

    time_s: float
    image: np.ndarray  # uint8 RGB [H, W, 3]
    mask: np.ndarray  # uint8 [H, W] class ids
    classes: list[dict[str, Any]]  # per class present: id, name, pixel_fraction


def overlay_with_legend(prediction: LegendFrame, palette: np.ndarray | None = None, note: str | None = None) -> np.ndarray:
    """uint8 RGB `[H, W + panel, 3]`: the frame with its mask blended in (`outlined_overlay`) and a
    legend panel on the right (time, `note`, then a colour swatch, name and pixel share per class
    present). The panel's width depends only on H, so every picture of a video has one size."""
    return LegendOverlay(prediction, palette, note)(prediction.image)


class LegendOverlay:
    """`overlay_with_legend` of one prediction, prepared once to be painted on many frames: the
    frames of the source video between this prediction and the next (`overlay.mp4` at the
    source's frame rate) get this prediction's mask and legend. `painter(image)` for a frame of
    the prediction's size equals `overlay_with_legend` with that image."""

    def __init__(self, prediction: LegendFrame, palette: np.ndarray | None = None, note: str | None = None) -> None:
        palette = avss_palette() if palette is None else palette
        mask = np.asarray(prediction.mask)
        self.shape = mask.shape
        self.painted = mask != 0
        colours = colorize(mask, palette)
        self.fill = colours[self.painted].astype(np.float32)
        self.outer = mask_outline(mask)
        self.inner = _grown(self.outer, outline_width(mask)) & ~self.outer & self.painted
        self.inner_colours = colours[self.inner]
        height = mask.shape[0]
        font_px = legend_font_px(height)
        lines: list[tuple[tuple[int, int, int] | None, str]] = [(None, f"t {prediction.time_s:.2f} s")]
        if note:
            lines.append((None, note))
        if not prediction.classes:
            lines.append((None, "nothing sounding"))
        for entry in prediction.classes:
            lines.append((class_colour(entry["id"], palette), f"{entry['name']} {share_text(entry['pixel_fraction'], 0)}"))
        self.panel = np.asarray(_text_block(13 * font_px, height, lines, font_px))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB `[H, W + panel, 3]` of `image` (uint8 `[H, W, 3]`, the prediction's size)."""
        if image.shape[:2] != self.shape:
            raise ValueError(f"image {image.shape[:2]} and mask {self.shape} sizes differ")
        picture = image.copy()
        # The arithmetic of `overlay` (float32, rounded), on the painted pixels only.
        blended = (1.0 - OVERLAY_ALPHA) * image[self.painted].astype(np.float32) + OVERLAY_ALPHA * self.fill
        picture[self.painted] = np.rint(blended).astype(np.uint8)
        picture[self.inner] = self.inner_colours
        picture[self.outer] = OUTLINE_COLOR
        return np.concatenate([picture, self.panel], axis=1)


def share_text(fraction: float, digits: int = 1) -> str:
    """A pixel share for a legend: `12.5%`, and `<0.1%` (not `0.0%`) for a class that is there
    but smaller than the last digit."""
    percent = 100.0 * float(fraction)
    smallest = 10.0 ** -digits
    if 0 < percent < smallest / 2:
        return f"<{smallest:.{digits}f}%"
    return f"{percent:.{digits}f}%"


def wrap_text(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """`text` broken at spaces into lines at most `width` pixels wide (a single word wider than
    that is broken between characters): labels are wrapped, never cut at a picture's edge."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    lines.append(current)
    return lines


def _line_px(font_px: int) -> int:
    return font_px + max(4, font_px // 3)


def _wrapped_lines(
    width: int, lines: Sequence[tuple[tuple[int, int, int] | None, str]], font_px: int
) -> list[tuple[tuple[int, int, int] | None, str, bool]]:
    """Every entry wrapped to the block's text width: `(swatch colour or None, text, indented)`;
    the swatch is on an entry's first line, its other lines are indented to the text."""
    font = _font(font_px)
    margin = max(3, font_px // 3)
    out: list[tuple[tuple[int, int, int] | None, str, bool]] = []
    for colour, text in lines:
        indent = (font_px - 2 + margin) if colour is not None else 0
        for i, part in enumerate(wrap_text(text, width - 2 * margin - indent, font)):
            out.append((colour if i == 0 else None, part, colour is not None))
    return out


def text_height(width: int, lines: Sequence[tuple[tuple[int, int, int] | None, str]], font_px: int = FONT_PX) -> int:
    """Height of a `_text_block` of this width that shows every line, wrapped."""
    return max(1, len(_wrapped_lines(width, lines, font_px))) * _line_px(font_px)


def _text_block(
    width: int,
    height: int,
    lines: Sequence[tuple[tuple[int, int, int] | None, str]],
    font_px: int = FONT_PX,
    fill: tuple[int, int, int] = TEXT,
) -> Image.Image:
    """A dark `width x height` block with the lines of text, each wrapped to the width, a colour
    swatch (on a neutral grey chip, with a white border) before the text where the entry has a
    colour. Lines that do not fit in the height end in `+N more`."""
    block = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(block)
    font = _font(font_px)
    line = _line_px(font_px)
    top = max(1, (line - font_px) // 2 - 1)  # the glyphs' box starts ~font_px / 5 below y
    margin = max(3, font_px // 3)
    wrapped = _wrapped_lines(width, lines, font_px)
    fits = max(1, height // line)
    if len(wrapped) > fits:
        wrapped = wrapped[: fits - 1] + [(None, f"+{len(wrapped) - fits + 1} more lines", False)]
    for row, (colour, text, indented) in enumerate(wrapped):
        y, x = row * line + top, margin
        if colour is not None:
            side = font_px - 2
            draw.rectangle([x - 2, y + 1, x + side + 1, y + 5 + side - 1], fill=SWATCH_CHIP)
            draw.rectangle([x, y + 3, x + side - 1, y + 3 + side - 1], fill=colour, outline=OUTLINE_COLOR)
        if indented:
            x += font_px - 2 + margin
        draw.text((x, y), text, fill=fill, font=font)
    return block


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
    logmel: np.ndarray | None = None  # float32 [frames, mel_bins]: the audio the model was given
    sounding: tuple[int, ...] | None = None  # task ids that sound in the frame (ground truth)
    video: str | None = None
    frame: int | None = None


def triptych(frame: FramePicture, palette: np.ndarray | None = None) -> np.ndarray:
    """uint8 `[S, 3S, 3]`: image | ground-truth overlay | prediction overlay at the model's size
    and the official blend (no upscaling, no text; `frame_picture` is the picture to look at)."""
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


# --------------------------------------------------------------------------------------------
# Evaluation pictures
# --------------------------------------------------------------------------------------------


def panel_size(image_size: int) -> int:
    """Side of each panel of a frame picture: the model's input size, at least `PANEL_MIN_PX`."""
    return max(PANEL_MIN_PX, int(image_size))


def upscale_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB `[H, W, 3]` -> `[size, size, 3]` (bicubic; the identity at the same size)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image, mode="RGB").resize((size, size), Image.Resampling.BICUBIC))


def upscale_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 class ids `[H, W]` -> `[size, size]` by nearest neighbour (no invented labels)."""
    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").resize((size, size), Image.Resampling.NEAREST))


@dataclass(frozen=True)
class FrameLayout:
    """Where things are in a `frame_picture` or `controls_picture` (pixels): `panels` holds the
    top-left corners of the panels, left to right, each `panel` pixels square."""

    width: int
    height: int
    panel: int
    panels: tuple[tuple[int, int], ...]
    info_y: int
    audio_y: int  # top of the audio header; the strip is below it


def frame_layout(image_size: int) -> FrameLayout:
    """The layout of `frame_picture` for frames of `image_size` pixels (depends on nothing else)."""
    panel = panel_size(image_size)
    width = 3 * panel + 2 * GAP_PX
    info_y = TITLE_PX + panel
    audio_y = info_y + INFO_LINES * LINE_PX + GAP_PX
    height = audio_y + AUDIO_HEADER_PX + AUDIO_STRIP_PX
    corners = tuple((i * (panel + GAP_PX), TITLE_PX) for i in range(3))
    return FrameLayout(width, height, panel, corners, info_y, audio_y)


def class_name(class_id: int, class_names: Sequence[str] | None) -> str:
    """The task class name of an id (`class_{id}` when unknown; the ignore label is "ignored")."""
    if class_id == IGNORE_INDEX:
        return "ignored"
    if class_names is not None and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return f"class_{class_id}"


def class_shares(mask: np.ndarray, class_names: Sequence[str] | None, palette: np.ndarray | None = None) -> list[tuple[tuple[int, int, int], str]]:
    """Legend lines of a mask: per class present (not background), largest first, its colour and
    `name  share%` of the frame's pixels."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    present = [int(c) for c in np.flatnonzero(counts) if c != 0]
    present.sort(key=lambda c: (-counts[c], c))
    total = max(1, int(mask.size))
    return [(class_colour(c, palette), f"{class_name(c, class_names)}  {share_text(counts[c] / total)}") for c in present]


def sounding_text(sounding: Sequence[int] | None, class_names: Sequence[str] | None) -> str:
    """"sounding (ground truth): a, b" / "silent (nothing sounds)" / "" when unknown."""
    if sounding is None:
        return ""
    if not sounding:
        return "sounding (ground truth): nothing (silent)"
    return "sounding (ground truth): " + ", ".join(class_name(int(c), class_names) for c in sounding)


def logmel_picture(logmel: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """uint8 RGB `[height, width, 3]`: a log-mel `[frames, mel_bins]` (dB) in the magma colour map
    over `LOGMEL_DB_RANGE` (black at the -100 dB floor, e.g. the silent control), time left to
    right, low mel bins at the bottom. Black when `logmel` is None."""
    if logmel is None or np.asarray(logmel).size == 0:
        return np.zeros((height, width, 3), dtype=np.uint8)
    from matplotlib import colormaps

    values = np.asarray(logmel, dtype=np.float32).reshape(-1, np.asarray(logmel).shape[-1])
    low, high = LOGMEL_DB_RANGE
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    rgb = (colormaps["magma"](scaled.T[::-1])[..., :3] * 255.0).round().astype(np.uint8)  # [mel, frames, 3]
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((width, height), Image.Resampling.NEAREST))


def _score_text(score: float) -> str:
    return "n/a" if not math.isfinite(score) else f"{score:.3f}"


# What the reports call each `eval.audio_control`: "none" (no control) is the frame's own audio.
AUDIO_LABELS = {"none": "normal", "shuffled": "shuffled", "silent": "silent"}


def audio_label(control: str) -> str:
    """`normal` / `shuffled` / `silent` for an `eval.audio_control` value (never "none", which
    reads as "no audio")."""
    return AUDIO_LABELS.get(control, control)


def _image_info(frame: FramePicture, where: bool = True) -> list[tuple[tuple[int, int, int] | None, str]]:
    """The lines under the image panel: which frame (its video and index, else its key; long
    video ids wrap onto a second line) unless `where` is False (a title says it), and its size."""
    if not where:
        lines = []
    elif frame.video is not None:
        lines = [(None, f"video {frame.video}"), (None, f"frame {frame.frame}")]
    else:
        lines = [(None, frame.key)]
    return [(None, "image"), *lines, (None, f"{frame.image.shape[1]} px model input")]


def _truth_info(
    frame: FramePicture, class_names: Sequence[str] | None, palette: np.ndarray
) -> list[tuple[tuple[int, int, int] | None, str]]:
    heard = sounding_text(frame.sounding, class_names).replace(" (ground truth)", "")
    return [(None, "ground truth"), *([(None, heard)] if heard else []),
            *(class_shares(frame.target, class_names, palette) or [(None, "background only")])]


def frame_picture(
    frame: FramePicture,
    class_names: Sequence[str] | None = None,
    audio_control: str = "none",
    palette: np.ndarray | None = None,
    rank: int | None = None,
    label: str = "",
) -> np.ndarray:
    """uint8 RGB `[H, W, 3]` of one frame, laid out as `frame_layout(S)` (see the module docstring).

    Args:
        frame: the frame at the model's input size S (with its log-mel and sounding classes when
            known; the picture says so when they are not).
        class_names: names of the task's classes by id (legend, sounding line).
        audio_control: what the model heard (`none`, `shuffled`, `silent`; drawn as `audio_label`).
        palette: default `display_palette(class_names)`.
        rank: a number to put first in the title (the contact sheet's order).
        label: why the frame is drawn (e.g. `best`), after the rank.
    """
    palette = display_palette(class_names) if palette is None else palette
    layout = frame_layout(frame.image.shape[0])
    size = layout.panel
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    prefix = (f"{rank}. " if rank is not None else "") + (f"{label}   " if label else "")
    title = f"{prefix}frame IoU {_score_text(frame.score)}   audio: {audio_label(audio_control)}"
    canvas.paste(_text_block(layout.width, TITLE_PX, [(None, title)]), (0, 0))
    image = upscale_image(frame.image, size)
    panels = [
        image,
        outlined_overlay(image, upscale_mask(frame.target, size), palette),
        outlined_overlay(image, upscale_mask(frame.prediction, size), palette),
    ]
    info_height = INFO_LINES * LINE_PX
    infos = [
        _image_info(frame),
        _truth_info(frame, class_names, palette),
        [(None, "prediction")] + (class_shares(frame.prediction, class_names, palette) or [(None, "background only")]),
    ]
    for (x, y), panel, info in zip(layout.panels, panels, infos, strict=True):
        canvas.paste(Image.fromarray(panel), (x, y))
        canvas.paste(_text_block(size, info_height, info), (x, layout.info_y))
    header = f"log-mel the model was given (audio: {audio_label(audio_control)})"
    canvas.paste(_text_block(layout.width, AUDIO_HEADER_PX, [(None, header)]), (0, layout.audio_y))
    strip = logmel_picture(frame.logmel, layout.width, AUDIO_STRIP_PX)
    canvas.paste(Image.fromarray(strip), (0, layout.audio_y + AUDIO_HEADER_PX))
    return np.asarray(canvas)


CONTROLS_ORDER = ("none", "shuffled", "silent")


def controls_layout(image_size: int) -> FrameLayout:
    """Where things are in a `controls_picture`: `panels` holds the corners of the image, ground
    truth, and the predictions with normal, shuffled and silent audio (in that order)."""
    panel = panel_size(image_size)
    width = 5 * panel + 4 * GAP_PX
    top = TITLE_PX + LINE_PX  # the title, then a label above each panel
    info_y = top + panel
    audio_y = info_y + INFO_LINES * LINE_PX + GAP_PX
    height = audio_y + AUDIO_HEADER_PX + AUDIO_STRIP_PX
    corners = tuple((i * (panel + GAP_PX), top) for i in range(5))
    return FrameLayout(width, height, panel, corners, info_y, audio_y)


def controls_picture(
    frames: dict[str, FramePicture],
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    title: str = "",
) -> np.ndarray:
    """uint8 RGB picture of one frame under every audio condition it was evaluated with, side by
    side: `image | ground truth | prediction with normal | shuffled | silent audio`, each prediction
    labelled with its frame IoU, its legend under it and the log-mel it was given beneath.

    Args:
        frames: `eval.audio_control` (`none`, `shuffled`, `silent`) -> the frame as evaluated under
            it (same key, image and ground truth; its own prediction, score and log-mel). A missing
            condition leaves its column empty, saying so.
        class_names: names of the task's classes by id.
        palette: default `display_palette(class_names)`.
        title: the picture's first line (e.g. why the frame was chosen).
    """
    if not frames:
        raise ValueError("a controls picture needs at least one audio condition")
    palette = display_palette(class_names) if palette is None else palette
    first = next(iter(frames.values()))
    keys = {frame.key for frame in frames.values()}
    if len(keys) != 1:
        raise ValueError(f"a controls picture shows one frame, got {sorted(keys)}")
    layout = controls_layout(first.image.shape[0])
    size = layout.panel
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    canvas.paste(_text_block(layout.width, TITLE_PX, [(None, title or first.key)]), (0, 0))
    image = upscale_image(first.image, size)
    columns: list[tuple[str, np.ndarray | None, list[tuple[tuple[int, int, int] | None, str]]]] = [
        ("image", image, _image_info(first, where=not title)[1:]),  # the column is labelled already
        ("ground truth", outlined_overlay(image, upscale_mask(first.target, size), palette),
         class_shares(first.target, class_names, palette) or [(None, "background only")]),
    ]
    for control in CONTROLS_ORDER:
        frame = frames.get(control)
        label = f"audio: {audio_label(control)}"
        if frame is None:
            columns.append((label, None, [(None, "not evaluated")]))
            continue
        shares = class_shares(frame.prediction, class_names, palette) or [(None, "background only")]
        columns.append((f"{label}   IoU {_score_text(frame.score)}", outlined_overlay(image, upscale_mask(frame.prediction, size), palette), shares))
    for (x, y), (label, panel, info) in zip(layout.panels, columns, strict=True):
        canvas.paste(_text_block(size, LINE_PX, [(None, label)]), (x, y - LINE_PX))
        if panel is not None:
            canvas.paste(Image.fromarray(panel), (x, y))
        canvas.paste(_text_block(size, INFO_LINES * LINE_PX, info), (x, layout.info_y))
    # Beneath: what was heard. Under image and ground truth, the sounding classes; under each
    # prediction, the log-mel it was given.
    heard = sounding_text(first.sounding, class_names) or "sounding: unknown"
    left = 2 * size + GAP_PX
    canvas.paste(
        _text_block(left, AUDIO_HEADER_PX + AUDIO_STRIP_PX, [(None, heard), (None, "right: the log-mel each prediction was given")]),
        (0, layout.audio_y),
    )
    for (x, _), control in zip(layout.panels[2:], CONTROLS_ORDER, strict=True):
        frame = frames.get(control)
        canvas.paste(_text_block(size, AUDIO_HEADER_PX, [(None, f"log-mel: {audio_label(control)}")], fill=DIM_TEXT), (x, layout.audio_y))
        strip = logmel_picture(None if frame is None else frame.logmel, size, AUDIO_STRIP_PX)
        canvas.paste(Image.fromarray(strip), (x, layout.audio_y + AUDIO_HEADER_PX))
    return np.asarray(canvas)


def sheet_size(count: int, image_size: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of `count` frames of `image_size` px."""
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    layout = frame_layout(image_size)
    return columns * layout.width + (columns - 1) * SEPARATOR_PX, rows * layout.height + (rows - 1) * SEPARATOR_PX


def contact_sheet(
    frames: Sequence[FramePicture],
    columns: int = 2,
    palette: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    audio_control: str = "none",
) -> np.ndarray:
    """uint8 RGB grid of `frame_picture`s (row-major, in the given order, numbered from 1).
    Size: `sheet_size(len(frames), S, columns)`."""
    if not frames:
        raise ValueError("a contact sheet needs at least one frame")
    size = frames[0].image.shape[0]
    layout = frame_layout(size)
    width, height = sheet_size(len(frames), size, columns)
    columns = max(1, min(columns, len(frames)))
    sheet = Image.new("RGB", (width, height), (12, 12, 12))
    for index, frame in enumerate(frames):
        if frame.image.shape[:2] != (size, size):
            raise ValueError(f"frame {frame.key}: image {frame.image.shape[:2]}, others are {size} px")
        row, column = divmod(index, columns)
        picture = frame_picture(frame, class_names, audio_control, palette, rank=index + 1)
        sheet.paste(Image.fromarray(picture), (column * (layout.width + SEPARATOR_PX), row * (layout.height + SEPARATOR_PX)))
    return np.asarray(sheet)


def video_strip(
    frames: Sequence[FramePicture],
    title: str,
    class_names: Sequence[str] | None = None,
    audio_control: str = "none",
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 RGB picture of one video: its frames left to right (in the given order), a ground-truth
    row and a prediction row (`STRIP_CELL_PX` square cells, each with the frame index and IoU), the
    frames' log-mels side by side beneath (each under its frame), the sounding classes of each
    frame under its second, and a legend of every class in the rows. Text is wrapped, and the
    picture as tall as the longest text needs. `palette`: default `display_palette(class_names)`."""
    if not frames:
        raise ValueError("a video strip needs at least one frame")
    palette = display_palette(class_names) if palette is None else palette
    cell = STRIP_CELL_PX
    width = len(frames) * cell + (len(frames) - 1) * GAP_PX
    present = sorted(
        {int(c) for f in frames for m in (f.target, f.prediction) for c in np.unique(m) if c != 0}
    )
    legend_lines: list[tuple[tuple[int, int, int] | None, str]] = [
        (class_colour(c, palette), class_name(c, class_names)) for c in present
    ] or [(None, "background only")]
    # Legend as a grid of columns of fixed width, as many rows as needed.
    legend_column = 12 * FONT_PX
    per_row = max(1, width // legend_column)
    legend_rows = max(1, -(-len(legend_lines) // per_row))
    legend_px = max(text_height(legend_column, [line]) for line in legend_lines)
    heard_lines = []
    for frame in frames:
        names = [class_name(int(c), class_names) for c in frame.sounding] if frame.sounding is not None else None
        heard_lines.append([(None, "sounding: " + ("?" if names is None else (", ".join(names) or "nothing (silent)")))])
    heard_px = max(text_height(cell, lines) for lines in heard_lines)
    row_label_px = LINE_PX
    height = (
        TITLE_PX
        + 2 * (row_label_px + LINE_PX + cell)
        + AUDIO_HEADER_PX + AUDIO_STRIP_PX + heard_px
        + legend_rows * legend_px + GAP_PX
    )
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(_text_block(width, TITLE_PX, [(None, f"{title}   audio: {audio_label(audio_control)}")]), (0, 0))
    y = TITLE_PX
    for row_name, masks in (("ground truth", [f.target for f in frames]), ("prediction", [f.prediction for f in frames])):
        canvas.paste(_text_block(width, row_label_px, [(None, row_name)], fill=DIM_TEXT), (0, y))
        y += row_label_px
        for i, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            x = i * (cell + GAP_PX)
            label = f"frame {frame.frame if frame.frame is not None else i}   IoU {_score_text(frame.score)}"
            canvas.paste(_text_block(cell, LINE_PX, [(None, label)]), (x, y))
            image = upscale_image(frame.image, cell)
            canvas.paste(Image.fromarray(outlined_overlay(image, upscale_mask(mask, cell), palette)), (x, y + LINE_PX))
        y += LINE_PX + cell
    header = f"log-mel the model was given (audio: {audio_label(audio_control)}), one second per frame"
    canvas.paste(_text_block(width, AUDIO_HEADER_PX, [(None, header)], fill=DIM_TEXT), (0, y))
    y += AUDIO_HEADER_PX
    for i, (frame, lines) in enumerate(zip(frames, heard_lines, strict=True)):
        x = i * (cell + GAP_PX)
        canvas.paste(Image.fromarray(logmel_picture(frame.logmel, cell, AUDIO_STRIP_PX)), (x, y))
        canvas.paste(_text_block(cell, heard_px, lines), (x, y + AUDIO_STRIP_PX))
    y += AUDIO_STRIP_PX + heard_px
    for index, line in enumerate(legend_lines):
        row, column = divmod(index, per_row)
        canvas.paste(_text_block(legend_column, legend_px, [line]), (column * legend_column, y + row * legend_px))
    return np.asarray(canvas)
