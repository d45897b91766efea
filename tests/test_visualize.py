"""Evaluation pictures read back from their PNGs: the masks are painted where they are, panels are
at least 256 px, the legend shows the classes present, the log-mel strip is the right way up, and
the collector picks the best / median / worst video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddeseg.pipelines.evaluate import PictureCollector
from ddeseg.visualize import (
    AUDIO_STRIP_PX,
    GAP_PX,
    STRIP_CELL_PX,
    FramePicture,
    contact_sheet,
    frame_layout,
    frame_picture,
    logmel_picture,
    save_png,
    sheet_size,
    video_strip,
)

NAMES = ["background", "dog", "guitar", "car", "piano", "baby", "cello", "drum", "flute", "horn"]
GREY = 100
ALPHA = 0.55  # the pictures' fill (55 % class colour, 45 % image)
# Palette colours written out by hand (VOC bits, see test_evaluate's palette test).
COLOURS = {2: (0, 128, 0), 5: (128, 0, 128), 9: (192, 0, 0)}


def blended(colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.rint((1 - ALPHA) * GREY + ALPHA * c)) for c in colour)


def grey_frame(size: int = 32) -> FramePicture:
    """A uniform grey frame (so that upscaling the image changes no pixel): ground truth with
    classes 2 and 5, prediction with classes 2 (shifted) and 9."""
    target = np.zeros((size, size), np.uint8)
    target[4:14, 4:12] = 2
    target[18:28, 16:30] = 5
    prediction = np.zeros((size, size), np.uint8)
    prediction[6:16, 4:12] = 2
    prediction[20:30, 2:10] = 9
    logmel = np.full((63, 16), -50.0, np.float32)
    return FramePicture("v2-vid-003", np.full((size, size, 3), GREY, np.uint8), target, prediction, 0.25,
                        logmel, (2, 5), "vid", 3)


def read_back(array: np.ndarray, path) -> np.ndarray:
    save_png(array, path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def interior(mask: np.ndarray, class_id: int) -> np.ndarray:
    """Pixels of `class_id` whose four neighbours are the same class (outlines are drawn elsewhere)."""
    inside = mask == class_id
    core = inside.copy()
    core[1:] &= inside[:-1]
    core[:-1] &= inside[1:]
    core[:, 1:] &= inside[:, :-1]
    core[:, :-1] &= inside[:, 1:]
    core[0], core[-1], core[:, 0], core[:, -1] = False, False, False, False
    return core


@pytest.mark.parametrize("panel_name,mask_name", [(2, "prediction"), (1, "target")])
def test_mask_panels_have_the_class_colours_at_the_mask_pixels(tmp_path, panel_name, mask_name):
    frame = grey_frame(32)
    picture = read_back(frame_picture(frame, NAMES), tmp_path / "frame.png")
    layout = frame_layout(32)
    assert picture.shape == (layout.height, layout.width, 3)
    assert layout.panel == 256  # 32 px input upscaled to the 256 px minimum
    x, y = layout.panels[panel_name]
    panel = picture[y : y + 256, x : x + 256]
    # nearest-neighbour upscaling by 8: panel pixel (r, c) shows mask pixel (r // 8, c // 8)
    mask = getattr(frame, mask_name)
    upscaled = np.repeat(np.repeat(mask, 8, axis=0), 8, axis=1)
    assert (panel[upscaled == 0] == GREY).all()  # background keeps the image
    for class_id in np.unique(mask[mask != 0]):
        core = interior(upscaled, class_id)
        assert core.sum() > 0.8 * (upscaled == class_id).sum()
        assert (panel[core] == blended(COLOURS[int(class_id)])).all(), class_id
        edge = (upscaled == class_id) & ~core
        assert (panel[edge] == (255, 255, 255)).all()  # the white outline


def test_a_dropped_prediction_would_fail_the_panel_check(tmp_path):
    # The check above can fail: a frame whose prediction is empty paints nothing in that panel.
    frame = grey_frame(32)
    empty = FramePicture(frame.key, frame.image, frame.target, np.zeros_like(frame.prediction), 0.0)
    picture = read_back(frame_picture(empty, NAMES), tmp_path / "frame.png")
    x, y = frame_layout(32).panels[2]
    assert (picture[y : y + 256, x : x + 256] == GREY).all()


def test_legend_shows_the_classes_of_each_mask_under_its_panel(tmp_path):
    frame = grey_frame(32)
    picture = read_back(frame_picture(frame, NAMES), tmp_path / "frame.png")
    layout = frame_layout(32)

    def colours_under(panel: int) -> set[tuple[int, ...]]:
        x = layout.panels[panel][0]
        block = picture[layout.info_y : layout.audio_y, x : x + layout.panel].reshape(-1, 3)
        return {tuple(int(v) for v in c) for c in np.unique(block, axis=0)}

    assert {COLOURS[2], COLOURS[5]} <= colours_under(1) and COLOURS[9] not in colours_under(1)
    assert {COLOURS[2], COLOURS[9]} <= colours_under(2) and COLOURS[5] not in colours_under(2)


def test_panels_are_never_smaller_than_256_and_keep_large_inputs():
    assert frame_layout(64).panel == 256
    assert frame_layout(352).panel == 352
    frame = grey_frame(40)
    assert frame_picture(frame, NAMES).shape[:2] == (frame_layout(40).height, frame_layout(40).width)
    sheet = contact_sheet([frame, frame, frame], columns=2, class_names=NAMES)
    assert sheet.shape[:2][::-1] == sheet_size(3, 40, 2)


def test_logmel_strip_has_low_bins_at_the_bottom_and_silence_black():
    logmel = np.full((50, 8), -100.0, np.float32)  # the front end's floor
    logmel[:, 7] = 15.0  # loud only in the highest mel bin
    picture = logmel_picture(logmel, 100, 40)
    assert picture.shape == (40, 100, 3)
    assert picture[:5].mean() > 150 and picture[-5:].mean() < 10  # top row bright, bottom black
    constant = logmel_picture(np.full((50, 8), -100.0, np.float32), 100, 40)
    assert constant.max() < 10  # the silent control's floor is not drawn as loud


def test_a_quiet_second_looks_quieter_than_a_loud_one():
    # One colour scale for every picture: a noise floor around -45 dB (a silent synthetic second)
    # must not be stretched to look as loud as a second with a +15 dB sound.
    rng = np.random.default_rng(0)
    quiet = rng.normal(-45.0, 3.0, (50, 8)).astype(np.float32)
    loud = quiet.copy()
    loud[:, 2:5] = 15.0
    assert logmel_picture(quiet, 100, 40).mean() + 40 < logmel_picture(loud, 100, 40).mean()


def test_video_strip_puts_frames_left_to_right():
    base = grey_frame(32)
    frames = [FramePicture(f"v2-vid-{i:03d}", base.image, base.target, base.prediction, 0.1 * i, base.logmel, (2,), "vid", i)
              for i in range(5)]
    strip = video_strip(frames, "best video vid", NAMES)
    assert strip.shape[1] == 5 * STRIP_CELL_PX + 4 * GAP_PX
    assert strip.shape[0] > 2 * STRIP_CELL_PX + AUDIO_STRIP_PX


def _add_video(collector: PictureCollector, video: str, scores: list[float]) -> None:
    n = len(scores)
    masks = torch.zeros(n, 4, 4, dtype=torch.long)
    collector.add(
        [f"v2-{video}-{i:03d}" for i in range(n)], torch.zeros(n, 3, 4, 4), masks, masks,
        torch.tensor(scores, dtype=torch.float64), logmels=torch.zeros(n, 1, 5, 3),
        sounding=[[1]] * n, videos=[video] * n, frames=torch.arange(n),
    )


def test_collector_picks_best_median_and_worst_video_by_mean_frame_iou():
    collector = PictureCollector(samples=0, worst=0, videos=10)
    _add_video(collector, "a", [0.9, 0.7])  # 0.8
    _add_video(collector, "b", [0.1, 0.3])  # 0.2
    _add_video(collector, "c", [0.5, 0.4, float("nan")])  # 0.45 (NaN frames not averaged)
    _add_video(collector, "d", [0.6])  # one frame: no strip
    strips = collector.video_strips()
    assert [(label, video) for label, video, _, _ in strips] == [("best", "a"), ("median", "c"), ("worst", "b")]
    assert strips[1][2] == pytest.approx(0.45)
    assert [f.frame for f in strips[1][3]] == [0, 1, 2] and strips[1][3][0].logmel.shape == (5, 3)
    assert strips[1][3][0].sounding == (1,)


def test_collector_keeps_at_most_the_asked_number_of_videos_by_hash():
    import zlib

    collector = PictureCollector(samples=0, worst=0, videos=2)
    names = [f"video{i}" for i in range(6)]
    for name in names:
        _add_video(collector, name, [0.5, 0.5])
    kept = {video for _, video, _, _ in collector.video_strips()}
    assert kept == set(sorted(names, key=lambda v: (zlib.crc32(v.encode()), v))[:2])
