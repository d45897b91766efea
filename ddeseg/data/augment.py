"""Image, mask and log-mel transforms: the training augmentation and the model's input preprocessing.

`preprocess_for_model` is the ONE eval-time path from a decoded frame and its log-mel to model
inputs; evaluation, `predict` and the training augmentation all end in it, so a model never
sees inputs prepared two different ways.

Training augmentation follows the official recipe (`dataload/data_augmentation.py`):

1. box-constrained random crop (`random_box_crop`): one draw of aspect ratio and crop area, the
   area between `crop_scale_min` x the area of the sounding box and the whole image; kept only
   when the crop still holds at least `crop_scale_min` of the box's area, otherwise the frame
   stays uncropped. No box (silent frame) -> no crop.
2. horizontal flip with probability 0.5 (the box is flipped with it).
3. colour jitter (brightness, contrast, saturation, hue) in a random order, as torchvision's
   `ColorJitter` on PIL images.
4. resize to `image_size` (image bilinear, mask nearest; PIL, as torchvision's `Resize` on PIL
   images that the official loader uses), ImageNet normalisation;
5. optionally (`augment.spec_augment`) SpecAugment time and mel stripes on the log-mel.

Steps 3 and 4 run in the official order (jitter on the cropped frame, then resize) when
`augment.jitter_before_resize` is true, as in the paper configs. False (ours, the demo's) jitters
after the resize, on `image_size`^2 pixels instead of the frame's (far cheaper on large frames),
but it is not the same image: the uint8 rounding and clipping of each operation, and the hue
round trip, happen on other pixels (docs/augmentations.md has a measurement). The random draws
are the same in both orders.

Every random draw comes from the `numpy.random.Generator` passed in, so a sample's augmentation
is a pure function of that generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ddeseg.config import AugmentConfig, Config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchlibrosa's SpecAugmentation in HTS-AT drops 2 stripes of up to 64 frames (of ~1000, i.e.
# 6.4 % of a 10 s clip) and 2 stripes of up to 8 mel bins; the time width scales with the clip.
SPEC_TIME_DROP_FRACTION = 0.064
SPEC_FREQ_DROP_WIDTH = 8
SPEC_STRIPES = 2

Box = Sequence[float]  # normalised [x0, y0, x1, y1]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def random_box_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: Box | None,
    rng: np.random.Generator,
    scale_min: float = 0.6,
    ratio: tuple[float, float] = (0.75, 1.3333),
) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Crop `image` `[H, W, 3]` and `mask` `[H, W]` so that most of the sounding `box` stays in.

    The official rule, one draw: aspect ~ U(ratio), area ~ U(scale_min * box area, H * W),
    position uniform; accepted when the crop keeps >= `scale_min` of the box's area, else the
    frame is returned unchanged. Returns the (possibly cropped) image and mask, views of the
    inputs, and the box in the crop's normalised coordinates (clipped to it).
    """
    height, width = mask.shape
    if box is None:
        return image, mask, None
    x_min, y_min = int(box[0] * width), int(box[1] * height)
    x_max, y_max = int(box[2] * width), int(box[3] * height)
    box_area = max(0, x_max - x_min) * max(0, y_max - y_min)

    aspect = rng.uniform(*ratio)
    area = rng.uniform(scale_min * box_area, width * height)
    crop_width = min(int(np.sqrt(area * aspect)), width)
    crop_height = min(int(np.sqrt(area / aspect)), height)
    # The official code accepts a degenerate 0-pixel crop around an empty box (and then fails
    # in the resize); we keep the frame whole instead.
    if crop_width < 1 or crop_height < 1:
        return image, mask, list(box)
    x0 = int(rng.integers(0, width - crop_width + 1))
    y0 = int(rng.integers(0, height - crop_height + 1))
    x1, y1 = x0 + crop_width, y0 + crop_height

    inter = max(0, min(x_max, x1) - max(x_min, x0)) * max(0, min(y_max, y1) - max(y_min, y0))
    if inter < scale_min * box_area:
        return image, mask, list(box)

    cropped_box = [
        float(np.clip((box[0] * width - x0) / crop_width, 0.0, 1.0)),
        float(np.clip((box[1] * height - y0) / crop_height, 0.0, 1.0)),
        float(np.clip((box[2] * width - x0) / crop_width, 0.0, 1.0)),
        float(np.clip((box[3] * height - y0) / crop_height, 0.0, 1.0)),
    ]
    return image[y0:y1, x0:x1], mask[y0:y1, x0:x1], cropped_box


def hflip(image: np.ndarray, mask: np.ndarray, box: Box | None) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Mirror image `[H, W, 3]`, mask `[H, W]` and normalised box left-right."""
    flipped_box = None if box is None else [1.0 - box[2], box[1], 1.0 - box[0], box[3]]
    return image[:, ::-1], mask[:, ::-1], flipped_box


def resize_image(image: np.ndarray, size: int) -> Image.Image:
    """uint8 `[H, W, 3]` -> PIL RGB `size x size`, bilinear (PIL: antialiased when shrinking)."""
    pil = Image.fromarray(np.ascontiguousarray(image))
    if pil.size == (size, size):
        return pil
    return pil.resize((size, size), Image.BILINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[H, W]` class ids -> uint8 `[size, size]`, nearest neighbour (no new ids)."""
    if mask.shape == (size, size):
        return np.ascontiguousarray(mask)
    pil = Image.fromarray(np.ascontiguousarray(mask))
    return np.asarray(pil.resize((size, size), Image.NEAREST))


# --------------------------------------------------------------------------------------------
# Photometric
# --------------------------------------------------------------------------------------------


def color_jitter(
    image: Image.Image, rng: np.random.Generator, strength: tuple[float, float, float, float]
) -> Image.Image:
    """torchvision `ColorJitter(brightness, contrast, saturation, hue)` semantics on a PIL image.

    Factors: U(1 - s, 1 + s) (clipped at 0) for the first three, U(-hue, hue) for the hue; the
    four operations run in a random order. A strength of 0 skips its operation.
    """
    brightness, contrast, saturation, hue = strength
    factors = [
        rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None,
        rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None,
        rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None,
        rng.uniform(-hue, hue) if hue > 0 else None,
    ]
    operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for index in rng.permutation(4):
        if factors[index] is not None:
            image = operations[index](image, float(factors[index]))
    return image


def spec_augment_logmel(logmel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SpecAugment of one log-mel `[frames, mel_bins]` (float32 copy), drawn from `rng`.

    `ddeseg.models.frontend.spec_augment` (torchlibrosa's stripes) with HTS-AT's stripe counts
    and mel width; the time width is HTS-AT's 64 frames of a 10 s clip scaled to this clip's
    length. HTS-AT masks with 0 after its `bn0`, i.e. with bn0's running mean; the loader works
    before `bn0` and does not know those statistics, so masked cells take this log-mel's mean.
    """
    from ddeseg.models.frontend import spec_augment  # the model package: imported on first use

    frames = logmel.shape[0]
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    tensor = torch.from_numpy(np.array(logmel, dtype=np.float32, copy=True))
    masked = spec_augment(
        tensor,
        generator,
        time_drop_width=max(1, round(SPEC_TIME_DROP_FRACTION * frames)),
        time_stripes=SPEC_STRIPES,
        freq_drop_width=SPEC_FREQ_DROP_WIDTH,
        freq_stripes=SPEC_STRIPES,
        fill=float(tensor.mean()),
    )
    return masked.numpy()


# --------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------

# (x / 255 - mean) / std == x * _SCALE + _SHIFT, per channel, float32.
_SCALE = (1.0 / (255.0 * np.array(IMAGENET_STD))).astype(np.float32).reshape(3, 1, 1)
_SHIFT = (-np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)).astype(np.float32).reshape(3, 1, 1)


def normalize_image(image: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 RGB `[H, W, 3]` (or PIL) -> float32 `[3, H, W]`, ImageNet-normalised."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
    # In numpy, as one multiply-add: small torch ops cost milliseconds each when the intra-op
    # thread pool competes with busy cores (the loader may run in the training process).
    channels_first = np.ascontiguousarray(array.transpose(2, 0, 1))
    return torch.from_numpy(channels_first * _SCALE + _SHIFT)


def logmel_tensor(logmel: np.ndarray) -> torch.Tensor:
    """float16/32 `[frames, mel_bins]` -> float32 `[1, frames, mel_bins]` (channel first)."""
    if logmel.ndim != 2:
        raise ValueError(f"log-mel must be [frames, mel_bins], got shape {logmel.shape}")
    # A copy: `np.load` of shard bytes gives a read-only array, which torch must not alias.
    return torch.from_numpy(np.array(logmel, dtype=np.float32, copy=True)).unsqueeze(0)


def preprocess_for_model(image_uint8_hwc: np.ndarray, logmel: np.ndarray, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation/prediction inputs, exactly as the official test loader prepares them.

    Args:
        image_uint8_hwc: the decoded frame, uint8 RGB `[H, W, 3]`.
        logmel: the frame's log-mel `[frames, mel_bins]` (from the shard or the front end).
        cfg: the run config (`cfg.data.image_size`).
    Returns:
        image float32 `[3, S, S]` (bilinear resize to S = `image_size`, ImageNet-normalised) and
        log-mel float32 `[1, frames, mel_bins]`. Batch with `torch.stack`.
    """
    _check_image(image_uint8_hwc)
    return normalize_image(resize_image(image_uint8_hwc, cfg.data.image_size)), logmel_tensor(logmel)


def augment_for_training(
    image: np.ndarray,
    mask: np.ndarray,
    box: Box | None,
    logmel: np.ndarray,
    cfg: Config,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float] | None]:
    """One training sample: crop, flip, jitter and resize (in `augment.jitter_before_resize`'s
    order), normalise; SpecAugment if enabled.

    Args:
        image: uint8 RGB `[H, W, 3]`; mask: uint8 `[H, W]` class ids (already mapped to the
            task's ids); box: the sounding `union_box` (normalised) or None; logmel:
            `[frames, mel_bins]`; rng: this sample's generator.
    Returns:
        image float32 `[3, S, S]`, mask int64 `[S, S]`, log-mel float32 `[1, frames, mel_bins]`
        and the box in the output's normalised coordinates (None when there was none).
    """
    _check_image(image)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} sizes differ")
    augment: AugmentConfig = cfg.data.augment
    size = cfg.data.image_size
    image, mask, box = random_box_crop(image, mask, box, rng, augment.crop_scale_min, tuple(augment.crop_ratio))
    # Drawn even when flipping is off, so that turning it off changes no other random draw.
    if rng.random() < 0.5 and augment.hflip:
        image, mask, box = hflip(image, mask, box)
    jitter = tuple(augment.color_jitter) if any(s > 0 for s in augment.color_jitter) else None
    if jitter is not None and augment.jitter_before_resize:
        jittered = color_jitter(Image.fromarray(np.ascontiguousarray(image)), rng, jitter)
        resized = resize_image(np.asarray(jittered), size)
    else:
        resized = resize_image(image, size)
        if jitter is not None:
            resized = color_jitter(resized, rng, jitter)
    if augment.spec_augment:
        logmel = spec_augment_logmel(logmel, rng)
    mask_tensor = torch.from_numpy(resize_mask(mask, size).astype(np.int64))
    return normalize_image(resized), mask_tensor, logmel_tensor(logmel), box


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: {image.shape}")
