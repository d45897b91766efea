"""Evaluation pictures read back from their PNGs: the masks are painted where they are, panels are
at least 192 px, the legend shows the classes present, the log-mel strip is the right way up, the
class colours are far apart and never near-black, labels are wrapped rather than cut, and the
collector picks the best / median / worst video and the chosen frames across videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddeseg.classes import AVSS_CLASSES, display_palette, readable_palette
from ddeseg.picture_choice import PictureCollector
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
# NAMES are not AVSS ids: the readable colours, ids 2, 5 and 9 (READABLE_COLOURS[1], [4], [8]),
# written out by hand.
COLOURS = {2: (255, 127, 14), 5: (148, 103, 189), 9: (170, 0, 255)}
# AVSS names at their official ids keep the official palette (VOC bits, see test_evaluate).
AVSS_COLOURS = {2: (0, 128, 0), 5: (128, 0, 128), 9: (192, 0, 0)}


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


def eroded(mask: np.ndarray, class_id: int, times: int) -> np.ndarray:
    """Pixels of `class_id` at least `times` pixels (4-neighbour steps) from any other label."""
    inside = mask == class_id
    for _ in range(times):
        inside = interior(np.where(inside, class_id, 0).astype(mask.dtype), class_id)
    return inside


@pytest.mark.parametrize("names,colours", [(NAMES, COLOURS), (list(AVSS_CLASSES), AVSS_COLOURS)], ids=["readable", "avss"])
@pytest.mark.parametrize("panel_name,mask_name", [(2, "prediction"), (1, "target")])
def test_mask_panels_have_the_class_colours_at_the_mask_pixels(tmp_path, panel_name, mask_name, names, colours):
    frame = grey_frame(32)
    picture = read_back(frame_picture(frame, names), tmp_path / "frame.png")
    layout = frame_layout(32)
    assert picture.shape == (layout.height, layout.width, 3)
    assert layout.panel == 192  # 32 px input upscaled to the 192 px minimum
    x, y = layout.panels[panel_name]
    panel = picture[y : y + 192, x : x + 192]
    # nearest-neighbour upscaling by 6: panel pixel (r, c) shows mask pixel (r // 6, c // 6)
    mask = getattr(frame, mask_name)
    upscaled = np.repeat(np.repeat(mask, 6, axis=0), 6, axis=1)
    assert (panel[upscaled == 0] == GREY).all()  # background keeps the image
    for class_id in np.unique(mask[mask != 0]):
        region = upscaled == class_id
        core = eroded(upscaled, class_id, 2)  # the rings are 2 px wide each at this size
        deep = eroded(upscaled, class_id, 4)
        assert deep.sum() > 0.4 * region.sum()
        assert (panel[deep] == blended(colours[int(class_id)])).all(), class_id
        assert (panel[region & ~core] == (255, 255, 255)).all()  # the outer ring: white
        assert (panel[core & ~deep] == colours[int(class_id)]).all()  # the inner ring: the class colour


def test_a_dropped_prediction_would_fail_the_panel_check(tmp_path):
    # The check above can fail: a frame whose prediction is empty paints nothing in that panel.
    frame = grey_frame(32)
    empty = FramePicture(frame.key, frame.image, frame.target, np.zeros_like(frame.prediction), 0.0)
    picture = read_back(frame_picture(empty, NAMES), tmp_path / "frame.png")
    x, y = frame_layout(32).panels[2]
    assert (picture[y : y + 192, x : x + 192] == GREY).all()


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


def test_panels_are_never_smaller_than_192_and_keep_large_inputs():
    assert frame_layout(64).panel == 192
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


# --------------------------------------------------------------------------------------------
# Colours, labels, the three audio conditions, the chosen frames
# --------------------------------------------------------------------------------------------


def cielab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 `[n, 3]` -> CIELAB (D65), from the CIE formulas (not from ddeseg)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@pytest.mark.parametrize("classes", [2, 9, 21, 25])  # binary, the demo's 8, the 20 of `demo --classes 20`, 24
def test_every_class_colour_differs_from_every_other_and_from_black_and_white(classes):
    names = ["background"] + [f"shape-{k}" for k in range(1, classes)]
    colours = display_palette(names)[1:classes]  # every colour a picture of these classes uses
    lab = cielab(colours)
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(len(lab)) * 1e9
    assert distance.min() >= 25.0  # CIE76: 2.3 is just noticeable; 25 is another colour
    assert lab[:, 0].min() >= 40.0  # no near-black fill ((64, 0, 0) has L* 12)
    white = cielab(np.array([[255, 255, 255]]))[0]
    assert np.linalg.norm(lab - white, axis=1).min() >= 25.0  # never mistaken for the outline


def test_the_check_catches_the_official_palettes_dark_colours():
    # The same check on the official AVSS colours of ids 1..8 fails: (64, 0, 0) is near-black.
    lab = cielab(display_palette(list(AVSS_CLASSES))[1:9])
    assert lab[:, 0].min() < 40.0
    assert not np.array_equal(readable_palette(9), display_palette(list(AVSS_CLASSES))[:9])


def test_share_text_never_says_zero_for_a_class_that_is_there():
    from ddeseg.visualize import share_text

    assert share_text(0.125) == "12.5%" and share_text(1 / 4096) == "<0.1%" and share_text(0.0) == "0.0%"
    assert share_text(0.004, 0) == "<1%" and share_text(0.5, 0) == "50%"


def test_long_labels_are_wrapped_not_cut():
    from ddeseg.visualize import _font, wrap_text

    font = _font(14)
    text = "sounding: hotel-hexagon, echo-star, golf-triangle, india-ring"
    lines = wrap_text(text, 150, font)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(font.getlength(line) <= 150 for line in lines)
    base = grey_frame(32)
    long_names = list(NAMES)
    long_names[2] = "a-very-long-class-name-that-does-not-fit"
    frames = [FramePicture(f"v2-vid-{i:03d}", base.image, base.target, base.prediction, 0.5, base.logmel, (2, 5, 9), "vid", i)
              for i in range(2)]
    short = video_strip(frames, "video vid", NAMES)
    wrapped = video_strip(frames, "video vid", long_names)
    assert wrapped.shape[0] > short.shape[0]  # the picture grows to show the whole label


def test_controls_picture_shows_each_conditions_prediction_in_its_column(tmp_path):
    from ddeseg.visualize import controls_layout, controls_picture

    frame = grey_frame(32)
    silent_prediction = np.zeros_like(frame.prediction)
    shuffled_prediction = np.zeros_like(frame.prediction)
    shuffled_prediction[0:8, 0:8] = 5
    frames = {
        "none": frame,
        "shuffled": FramePicture(frame.key, frame.image, frame.target, shuffled_prediction, 0.1, frame.logmel, (2, 5), "vid", 3),
        "silent": FramePicture(frame.key, frame.image, frame.target, silent_prediction, 0.0,
                               np.full((63, 16), -100.0, np.float32), (2, 5), "vid", 3),
    }
    picture = read_back(controls_picture(frames, NAMES, title="1. best"), tmp_path / "controls.png")
    layout = controls_layout(32)
    assert picture.shape == (layout.height, layout.width, 3) and len(layout.panels) == 5
    size = layout.panel

    def panel(i: int) -> np.ndarray:
        x, y = layout.panels[i]
        return picture[y : y + size, x : x + size]

    assert (panel(0) == GREY).all()  # the image
    up = 6  # 32 px -> 192 px
    assert tuple(panel(1)[4 * up + 8, 4 * up + 8]) == blended(COLOURS[2])  # ground truth: class 2 at [4:14, 4:12]
    assert tuple(panel(2)[20 * up + 8, 2 * up + 8]) == blended(COLOURS[9])  # normal: class 9 at [20:30, 2:10]
    assert tuple(panel(3)[3 * up, 3 * up]) == blended(COLOURS[5])  # shuffled: class 5 at [0:8, 0:8]
    assert (panel(4) == GREY).all()  # silent: nothing painted
    strip_y = layout.audio_y + (layout.height - layout.audio_y - 96)
    silent_x = layout.panels[4][0]
    assert picture[strip_y:, silent_x : silent_x + size].max() < 10  # silence: the log-mel floor, black
    normal_x = layout.panels[2][0]
    assert picture[strip_y:, normal_x : normal_x + size].mean() > 20  # -50 dB: visible


def test_controls_picture_refuses_two_different_frames():
    from ddeseg.visualize import controls_picture

    frame = grey_frame(32)
    other = FramePicture("v2-vid-004", frame.image, frame.target, frame.prediction, 0.2)
    with pytest.raises(ValueError, match="one frame"):
        controls_picture({"none": frame, "silent": other}, NAMES)


def _add_frames(collector: PictureCollector, rows: list[tuple[str, int, float]]) -> None:
    """rows: (video, frame index, score)."""
    n = len(rows)
    masks = torch.zeros(n, 4, 4, dtype=torch.long)
    collector.add(
        [f"v2-{video}-{frame:03d}" for video, frame, _ in rows], torch.zeros(n, 3, 4, 4), masks, masks,
        torch.tensor([score for _, _, score in rows], dtype=torch.float64),
        videos=[video for video, _, _ in rows], frames=[frame for _, frame, _ in rows],
    )


@pytest.mark.parametrize("seed", range(6))
def test_chosen_frames_are_best_median_worst_and_random_across_videos(seed):
    collector = PictureCollector(samples=8, worst=0, videos=0, seed=seed)
    # 8 videos of 3 frames, as many videos as pictures; video v's frames score v/8 + 0.01 * frame:
    # the three best frames of the split are all in video 7, the three worst in video 0.
    rows = [(f"vid{v:02d}", f, v / 8 + 0.01 * f) for v in range(8) for f in range(3)]
    for start in range(0, len(rows), 5):  # batches that cut videos apart
        _add_frames(collector, rows[start : start + 5])
    chosen = collector.chosen_frames()
    assert len(chosen) == 8
    assert [why for why, _ in chosen] == ["best"] * 2 + ["median"] * 2 + ["worst"] * 2 + ["random"] * 2
    videos = [frame.video for _, frame in chosen]
    assert len(set(videos)) == 8  # one frame per video
    by = {why: [frame.key for w, frame in chosen if w == why] for why in ("best", "worst")}
    assert by["best"] == ["v2-vid07-002", "v2-vid06-002"]  # each video's best frame, best videos first
    assert sorted(by["worst"]) == ["v2-vid00-000", "v2-vid01-000"]
    median = collector.median_score()
    scores = sorted(score for _, _, score in rows)
    assert median == pytest.approx((scores[11] + scores[12]) / 2)  # 24 frames
    for why, frame in chosen:
        if why == "median":
            assert abs(frame.score - median) < 0.2


def test_chosen_frames_do_not_depend_on_batching_and_keep_reproduces_them():
    rows = [(f"vid{v:02d}", f, ((v * 7 + f * 3) % 11) / 11) for v in range(9) for f in range(4)]
    one, other = PictureCollector(samples=6, worst=0, videos=0), PictureCollector(samples=6, worst=0, videos=0)
    _add_frames(one, rows)
    for row in reversed(rows):
        _add_frames(other, [row])
    chosen = [(why, f.key) for why, f in one.chosen_frames()]
    assert chosen == [(why, f.key) for why, f in other.chosen_frames()]
    # Another evaluation (another audio) of the same frames with `keep`: exactly those frames.
    keep = PictureCollector(samples=6, worst=0, videos=0, keep={key: why for why, key in chosen})
    _add_frames(keep, [(v, f, 0.0) for v, f, _ in rows])
    assert [(why, f.key) for why, f in keep.chosen_frames()] == chosen
    assert all(f.score == 0.0 for _, f in keep.chosen_frames())  # its own predictions and scores
