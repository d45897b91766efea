"""Augmentation and the model-input preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from ddeseg.config import Config
from ddeseg.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_for_training,
    color_jitter,
    hflip,
    preprocess_for_model,
    random_box_crop,
    resize_mask,
    spec_augment_logmel,
)


def tiny_config(size: int = 32) -> Config:
    cfg = Config()
    cfg.data.image_size = size
    return cfg


def box_frame(height: int, width: int, box_px: tuple[int, int, int, int], class_id: int = 3):
    """Random image and a mask with `class_id` exactly on the pixel box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box_px
    mask[y0:y1, x0:x1] = class_id
    box = [x0 / width, y0 / height, x1 / width, y1 / height]
    return image, mask, box


def mask_box(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    height, width = mask.shape
    return [xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height]


def test_box_crop_keeps_most_of_the_box_and_sometimes_crops():
    height, width = 90, 120
    image, mask, box = box_frame(height, width, (30, 20, 80, 70))
    box_area = int((mask > 0).sum())
    cropped_count, sizes = 0, set()
    for seed in range(300):
        out_image, out_mask, out_box = random_box_crop(image, mask, box, np.random.default_rng(seed), 0.6, (0.75, 1.3333))
        assert out_image.shape[:2] == out_mask.shape
        kept = int((out_mask > 0).sum())
        assert kept >= 0.6 * box_area  # the official rule: >= 60 % of the box stays inside
        # The returned box is the crop's view of the box: it matches the mask's box.
        np.testing.assert_allclose(out_box, mask_box(out_mask), atol=1e-6)
        if out_mask.shape != mask.shape:
            cropped_count += 1
            crop_h, crop_w = out_mask.shape
            sizes.add((crop_h, crop_w))
            assert crop_h <= height and crop_w <= width
    assert cropped_count > 30 and len(sizes) > 10


def test_box_crop_without_box_or_with_empty_box_is_identity():
    image, mask, _ = box_frame(40, 50, (0, 0, 0, 0))
    out_image, out_mask, out_box = random_box_crop(image, mask, None, np.random.default_rng(0))
    assert out_image is image and out_mask is mask and out_box is None
    for seed in range(50):  # a degenerate box never yields an empty crop
        out_image, out_mask, _ = random_box_crop(image, mask, [0.5, 0.5, 0.5, 0.5], np.random.default_rng(seed))
        assert out_image.shape[0] > 0 and out_image.shape[1] > 0


def test_hflip_flips_the_box_with_the_mask():
    image, mask, box = box_frame(30, 40, (5, 3, 15, 20))
    flipped_image, flipped_mask, flipped_box = hflip(image, mask, box)
    np.testing.assert_array_equal(flipped_image[:, 0], image[:, -1])
    np.testing.assert_allclose(flipped_box, mask_box(flipped_mask), atol=1e-6)
    np.testing.assert_allclose(flipped_box, [1 - 15 / 40, 3 / 30, 1 - 5 / 40, 20 / 30])


def test_augment_for_training_shapes_ids_and_box():
    cfg = tiny_config(48)
    image, mask, box = box_frame(96, 128, (40, 30, 100, 80), class_id=7)
    logmel = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float16)
    for seed in range(40):
        out_image, out_mask, out_logmel, out_box = augment_for_training(
            image, mask, box, logmel, cfg, np.random.default_rng(seed)
        )
        assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.float32
        assert out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
        assert out_logmel.shape == (1, 20, 64) and out_logmel.dtype == torch.float32
        assert set(out_mask.unique().tolist()) <= {0, 7}  # nearest resize: no new ids
        assert int((out_mask == 7).sum()) > 0  # the sounding object stays in view
        # The returned box still frames the object after crop, flip and resize (nearest
        # rounding moves edges by at most about a pixel of the output).
        np.testing.assert_allclose(out_box, mask_box(out_mask.numpy()), atol=2 / 48)
        torch.testing.assert_close(out_logmel[0], torch.from_numpy(logmel.astype(np.float32)))


def test_augment_is_deterministic_per_generator_seed():
    cfg = tiny_config()
    cfg.data.augment.spec_augment = True
    image, mask, box = box_frame(60, 70, (10, 10, 40, 50))
    logmel = np.random.default_rng(2).standard_normal((30, 64)).astype(np.float32)
    first = augment_for_training(image, mask, box, logmel, cfg, np.random.default_rng(11))
    again = augment_for_training(image, mask, box, logmel, cfg, np.random.default_rng(11))
    other = augment_for_training(image, mask, box, logmel, cfg, np.random.default_rng(12))
    for a, b in zip(first[:3], again[:3], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_preprocess_matches_the_official_torchvision_path():
    """Resize (PIL bilinear) + ToTensor + Normalize, as the official test loader does."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    logmel = rng.standard_normal((16, 64)).astype(np.float16)
    cfg = tiny_config(32)
    ours, ours_logmel = preprocess_for_model(image, logmel, cfg)
    official = T.Compose(
        [T.Resize((32, 32), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(Image.fromarray(image))
    torch.testing.assert_close(ours, official, atol=1e-6, rtol=0)
    assert ours_logmel.shape == (1, 16, 64) and ours_logmel.dtype == torch.float32
    # A constant image normalises to (v / 255 - mean) / std per channel.
    constant, _ = preprocess_for_model(np.full((8, 8, 3), 128, np.uint8), logmel, tiny_config(8))
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(constant[:, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_for_model(image.astype(np.float32), logmel, cfg)


def test_resize_mask_matches_torchvision_nearest():
    rng = np.random.default_rng(4)
    mask = rng.choice(np.array([0, 3, 70, 255], dtype=np.uint8), size=(45, 61))
    ours = resize_mask(mask, 24)
    official = np.asarray(T.Resize((24, 24), interpolation=T.InterpolationMode.NEAREST)(Image.fromarray(mask)))
    np.testing.assert_array_equal(ours, official)


def test_color_jitter_ranges():
    image = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    assert np.array_equal(np.asarray(color_jitter(image, np.random.default_rng(0), (0, 0, 0, 0))), np.asarray(image))
    means = [
        np.asarray(color_jitter(image, np.random.default_rng(seed), (0.2, 0, 0, 0))).mean() for seed in range(40)
    ]
    assert min(means) >= 100 * 0.8 - 1 and max(means) <= 100 * 1.2 + 1
    assert max(means) - min(means) > 20  # it does vary
    coloured = Image.fromarray(np.dstack([np.full((8, 8), 200), np.full((8, 8), 50), np.full((8, 8), 50)]).astype(np.uint8))
    hues = {tuple(np.asarray(color_jitter(coloured, np.random.default_rng(s), (0, 0, 0, 0.1)))[0, 0]) for s in range(10)}
    assert len(hues) > 1


def test_spec_augment_masks_stripes_with_the_clip_mean():
    rng = np.random.default_rng(5)
    logmel = rng.standard_normal((100, 64)).astype(np.float16) + 10.0
    fill = logmel.astype(np.float32).mean()
    changed_any = False
    for seed in range(20):
        out = spec_augment_logmel(logmel, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == logmel.shape
        changed = out != logmel.astype(np.float32)
        changed_any |= bool(changed.any())
        np.testing.assert_allclose(out[changed], fill, rtol=1e-5)
        rows, cols = changed.all(axis=1), changed.all(axis=0)
        # Time stripes: 2 of < round(0.064 * 100) = 6 frames; mel stripes: 2 of < 8 bins.
        assert rows.sum() <= 2 * 5 and cols.sum() <= 2 * 7
        assert (changed <= (rows[:, None] | cols[None, :])).all()  # only whole stripes
        np.testing.assert_array_equal(out, spec_augment_logmel(logmel, np.random.default_rng(seed)))
    assert changed_any


# ---- the official recipe, pinned (docs/augmentations.md)


def test_box_crop_keeps_the_official_share_of_the_box_not_always_all_of_it():
    """The official constraint is on area: a crop is kept only when >= crop_scale_min (0.6) of the
    sounding box's area stays inside; it may cut into the box (it is not "the whole box stays in")."""
    image, mask, box = box_frame(100, 100, (20, 20, 80, 80))
    box_area = int((mask > 0).sum())
    kept_shares = []
    for seed in range(400):
        _, out_mask, _ = random_box_crop(image, mask, box, np.random.default_rng(seed), 0.6, (0.75, 1.3333))
        kept_shares.append(int((out_mask > 0).sum()) / box_area)
    assert min(kept_shares) >= 0.6
    assert any(share < 1.0 for share in kept_shares)  # the box was cut into, within the rule
    assert sum(share == 1.0 for share in kept_shares) > 0


def test_flip_moves_image_and_mask_together():
    """No crop (no box), no jitter, no resize: the output is the frame, flipped or not, and the
    image's painted object is always where the mask's is."""
    cfg = tiny_config(40)
    cfg.data.augment.color_jitter = (0.0, 0.0, 0.0, 0.0)
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    image[5:30, 2:12] = 255
    mask[5:30, 2:12] = 4
    logmel = np.zeros((10, 64), np.float32)
    flips = set()
    for seed in range(30):
        out_image, out_mask, _, _ = augment_for_training(image, mask, None, logmel, cfg, np.random.default_rng(seed))
        painted = out_image[0] > 0  # normalised 255 > 0, normalised 0 < 0
        np.testing.assert_array_equal(painted.numpy(), out_mask.numpy() == 4)
        flips.add(bool(out_mask[10, 35] == 4))
        assert bool(out_mask[10, 35] == 4) != bool(out_mask[10, 4] == 4)  # either the frame or its mirror
    assert flips == {True, False}


@pytest.mark.parametrize("before_resize", [True, False])
def test_jitter_runs_before_or_after_the_resize_as_configured(before_resize):
    """With brightness alone the draws are: the flip's, then the brightness factor. The output
    must be resize(brightness(frame)) (official order) or brightness(resize(frame)) (ours)."""
    import torchvision.transforms.functional as TF

    from ddeseg.data.augment import normalize_image, resize_image

    cfg = tiny_config(24)
    cfg.data.augment.hflip = False
    cfg.data.augment.color_jitter = (0.2, 0.0, 0.0, 0.0)
    cfg.data.augment.jitter_before_resize = before_resize
    rng = np.random.default_rng(7)
    image = rng.integers(150, 256, size=(90, 70, 3), dtype=np.uint8)  # bright: brightening clips
    for seed in range(3):
        out_image, _, _, _ = augment_for_training(image, np.zeros((90, 70), np.uint8), None, np.zeros((4, 64), np.float32), cfg, np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        draws.random()  # the flip's draw
        factor = draws.uniform(0.8, 1.2)
        official = resize_image(np.asarray(TF.adjust_brightness(Image.fromarray(image), factor)), 24)
        ours = TF.adjust_brightness(resize_image(image, 24), factor)
        expected, other = (official, ours) if before_resize else (ours, official)
        torch.testing.assert_close(out_image, normalize_image(expected), rtol=0, atol=0)
        if factor > 1.05:  # clipping makes the two orders differ
            assert not torch.equal(out_image, normalize_image(other))


def test_eval_loader_is_resize_and_normalise_only(prepared_synthetic, micro_config_overrides):
    """Every eval sample is the decoded frame through the official test transform (bilinear
    resize, ToTensor, Normalize) and its mask resized nearest: no crop, flip or jitter, whatever
    the augmentation settings and the seed."""
    from ddeseg.config import load_config
    from ddeseg.data import schema
    from ddeseg.data.shards import ShardIndex
    from ddeseg.data.stream import make_eval_loader, read_shard_samples

    config = load_config(prepared_synthetic.config, micro_config_overrides)
    config.data.augment.jitter_before_resize = True
    size = config.data.image_size
    shards = sorted((prepared_synthetic.shards / "v2" / "val").glob("*.tar"))
    lut = ShardIndex(prepared_synthetic.shards).label_lut(config.task, config.model.num_classes)
    raw = {}
    for sample in read_shard_samples(shards):
        if schema.MASK in sample:
            raw[sample["__key__"]] = sample
    official = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    seen = 0
    for batch in make_eval_loader(shards, config, batch_size=1, num_workers=0, label_lut=lut):
        sample = raw[batch["key"][0]]
        frame = schema.decode_image(sample[schema.image_member(sample)])
        assert frame.shape[0] != size  # a real resize happens
        torch.testing.assert_close(batch["image"][0], official(Image.fromarray(frame)), atol=1e-6, rtol=0)
        expected_mask = resize_mask(lut[schema.decode_mask(sample[schema.MASK])], size)
        np.testing.assert_array_equal(batch["mask"][0].numpy(), expected_mask)
        seen += 1
    assert seen == len(raw) > 0
