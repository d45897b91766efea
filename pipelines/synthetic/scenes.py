"""Scene model of the synthetic AVS dataset: class identities, scene sampling, rendering, sound.

Pure numpy, no file I/O: `synthetic_layouts` writes what this module produces, `synthetic`
orchestrates. Everything is a deterministic function of a `numpy.random.Generator`.

Class identities depend only on the class id (visual) and on `(class id, number of classes)`
(sound band), never on the seed: two datasets generated with different seeds share classes.

* Visual identity: a shape (`SHAPES`), a texture (`TEXTURES`) and a colour (golden-ratio hue
  steps), jittered per instance (size, position, shade, rotation) with a small motion per frame.
* Sound identity: a timbre (`TIMBRES`) inside the class's own frequency band. The bands split
  `BAND_RANGE_HZ` log-uniformly into `classes` contiguous bands; a class's sound is band-limited
  to the inner part of its band (`band_hz`), so its energy in that band marks it in any mix.
  Per instance: pitch / rate and loudness jitter.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# NATO words sort alphabetically in id order: AVSS `label2idx.json` lists classes alphabetically,
# so the synthetic ids are also the label2idx order.
CLASS_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)
MAX_CLASSES = len(CLASS_WORDS)
SHAPES = ("disc", "square", "triangle", "diamond", "star", "ring", "cross", "hexagon")
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient")
TIMBRES = ("harmonic", "noise", "chirp", "clicks", "am-tone", "vibrato", "pulsed-noise", "two-tone")

BAND_RANGE_HZ = (150.0, 7200.0)  # below 8 kHz: every file is 16 kHz
BAND_GUARD = 0.12  # fraction (log scale) of each band left empty on either side
AMBIENCE_RMS = 0.0008  # background hiss of every recording (never digital silence)
SOURCE_RMS = 0.1
RAMP_S = 0.02  # fade in / out of a source at the edges of its sounding seconds


@dataclass(frozen=True)
class ClassIdentity:
    """What makes a synthetic class recognisable, by eye and by ear."""

    class_id: int  # 1..classes (0 is background)
    name: str
    shape: str
    texture: str
    rgb: tuple[int, int, int]
    timbre: str
    band_hz: tuple[float, float]  # the band that holds (almost) all of the class's sound energy


def class_identities(classes: int) -> list[ClassIdentity]:
    """Identities of classes `1..classes` (index 0 of the returned list is class 1)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES}, got {classes}")
    low, high = BAND_RANGE_HZ
    edges = np.geomspace(low, high, classes + 1)
    identities = []
    for index in range(classes):
        class_id = index + 1
        shape = SHAPES[index % len(SHAPES)]
        texture = TEXTURES[(index + index // len(SHAPES)) % len(TEXTURES)]
        hue = (index * 0.6180339887) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, 0.92)
        ratio = edges[index + 1] / edges[index]
        inner = ratio**BAND_GUARD
        band = (round(float(edges[index] * inner), 1), round(float(edges[index + 1] / inner), 1))
        identities.append(
            ClassIdentity(
                class_id=class_id,
                name=f"{CLASS_WORDS[index]}-{shape}",
                shape=shape,
                texture=texture,
                rgb=(round(red * 255), round(green * 255), round(blue * 255)),
                timbre=TIMBRES[index % len(TIMBRES)],
                band_hz=band,
            )
        )
    return identities


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class ObjectInstance:
    """One visible object: its class, its jittered look and its trajectory (pixels, per frame)."""

    instance: int
    class_id: int
    centre: tuple[float, float]  # (x, y) at frame 0
    velocity: tuple[float, float]  # pixels per frame
    radius: float
    angle: float
    spin: float  # radians per frame
    shade: float  # brightness factor
    hue_shift: float
    wobble_phase: float

    def pose(self, frame: int) -> tuple[float, float, float, float]:
        """(centre x, centre y, radius, angle) at `frame`."""
        x = self.centre[0] + self.velocity[0] * frame
        y = self.centre[1] + self.velocity[1] * frame
        radius = self.radius * (1.0 + 0.04 * math.sin(self.wobble_phase + 1.3 * frame))
        return x, y, radius, self.angle + self.spin * frame


@dataclass
class Scene:
    """A video (AVS tasks) or a single image (VPO tasks) and what sounds when.

    `sounding[f][i]`: object `i` sounds during frame `f`'s second. `offscreen[f]`: classes that
    sound in that second without being visible. `silent[f]`: nothing sounds at all.
    """

    task: str
    width: int
    height: int
    num_frames: int
    objects: list[ObjectInstance]
    sounding: np.ndarray  # bool [frames, objects]
    offscreen: list[list[int]]
    silent: list[bool]
    offscreen_classes: list[int] = field(default_factory=list)

    @property
    def duration_s(self) -> int:
        return self.num_frames


def _midpoint(obj: ObjectInstance, steps: int) -> tuple[float, float]:
    return obj.centre[0] + obj.velocity[0] * steps / 2, obj.centre[1] + obj.velocity[1] * steps / 2


def _place_objects(
    rng: np.random.Generator, class_ids: list[int], width: int, height: int, num_frames: int
) -> list[ObjectInstance]:
    """Instances of `class_ids`, inside the frame at every frame and overlapping little.

    Rejection sampling of start positions; when the objects do not fit, all of them shrink and
    the placement starts again.
    """
    side = min(width, height)
    steps = num_frames - 1
    scale = 1.0
    for _attempt in range(10):
        placed: list[ObjectInstance] = []
        for instance, class_id in enumerate(class_ids):
            radius = float(rng.uniform(0.11, 0.18)) * side * scale
            speed = 0.012 * side
            vx, vy = (float(v) for v in rng.uniform(-speed, speed, size=2))
            margin = 1.25 * radius + 1.0
            x_lo, x_hi = margin + max(0.0, -vx * steps), width - margin - max(0.0, vx * steps)
            y_lo, y_hi = margin + max(0.0, -vy * steps), height - margin - max(0.0, vy * steps)
            travel = math.hypot(vx, vy) * steps
            for _try in range(60 if x_hi > x_lo and y_hi > y_lo else 0):
                x, y = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
                mid = (x + vx * steps / 2, y + vy * steps / 2)
                if all(
                    math.dist(mid, _midpoint(other, steps))
                    >= 1.05 * (radius + other.radius) + (travel + math.hypot(*other.velocity) * steps) / 2
                    for other in placed
                ):
                    placed.append(
                        ObjectInstance(
                            instance=instance,
                            class_id=class_id,
                            centre=(x, y),
                            velocity=(vx, vy),
                            radius=radius,
                            angle=float(rng.uniform(-0.4, 0.4)),
                            spin=float(rng.uniform(-0.05, 0.05)),
                            shade=float(rng.uniform(0.8, 1.08)),
                            hue_shift=float(rng.uniform(-0.015, 0.015)),
                            wobble_phase=float(rng.uniform(0, 2 * math.pi)),
                        )
                    )
                    break
            if len(placed) != instance + 1:
                break
        if len(placed) == len(class_ids):
            return placed
        scale *= 0.85
    raise RuntimeError(f"could not place {len(class_ids)} objects in {width}x{height}")


def _markov_schedule(rng: np.random.Generator, frames: int, objects: int) -> np.ndarray:
    """bool [frames, objects]: each object switches on/off with persistence."""
    state = rng.random(objects) < 0.5
    rows = []
    for _ in range(frames):
        rows.append(state.copy())
        flip = rng.random(objects) < 0.3
        state = np.where(flip, ~state, state)
    return np.array(rows, dtype=bool).reshape(frames, objects)


def sample_avs_scene(
    rng: np.random.Generator,
    task: str,
    classes: int,
    width: int,
    height: int,
    offscreen_rate: float,
    silent_rate: float,
) -> Scene:
    """A v1s / v1m / v2 video.

    v1s: one visible object (instance 0) is the single source and sounds in every non-silent
    second; 0..3 silent distractors; no off-screen sound. v1m: 2..4 visible objects, at least two
    of them sound during the video; off-screen sounds. v2: 1..4 objects, 10 seconds, off-screen
    sounds. A non-silent second always has at least one sound (visible or off-screen).
    """
    num_frames = 10 if task == "v2" else 5
    low = 2 if task == "v1m" else 1
    count = int(rng.integers(low, min(4, classes) + 1))
    class_ids = [int(c) + 1 for c in rng.permutation(classes)[:count]]
    objects = _place_objects(rng, class_ids, width, height, num_frames)
    silent = [bool(s) for s in rng.random(num_frames) < silent_rate]
    if all(silent):
        silent[int(rng.integers(num_frames))] = False
    hidden = [c for c in range(1, classes + 1) if c not in class_ids]
    offscreen_classes: list[int] = []
    if task != "v1s" and hidden:
        offscreen_classes = [int(c) for c in rng.permutation(hidden)[: int(rng.integers(1, 3))]]

    if task == "v1s":
        sounding = np.zeros((num_frames, count), dtype=bool)
        sounding[:, 0] = True
    else:
        sounding = _markov_schedule(rng, num_frames, count)
    offscreen: list[list[int]] = []
    for _frame in range(num_frames):
        sounds_off = []
        if offscreen_classes and rng.random() < offscreen_rate:
            sounds_off = [offscreen_classes[int(rng.integers(len(offscreen_classes)))]]
        offscreen.append(sounds_off)
    for frame in range(num_frames):
        if silent[frame]:
            sounding[frame] = False
            offscreen[frame] = []
        elif not sounding[frame].any() and not offscreen[frame]:
            sounding[frame, int(rng.integers(count))] = True
    if task == "v1m":
        awake = [f for f in range(num_frames) if not silent[f]]
        while np.count_nonzero(sounding.any(axis=0)) < 2:
            quiet = [i for i in range(count) if not sounding[:, i].any()]
            sounding[awake[int(rng.integers(len(awake)))], quiet[int(rng.integers(len(quiet)))]] = True
    return Scene(
        task=task,
        width=width,
        height=height,
        num_frames=num_frames,
        objects=objects,
        sounding=sounding,
        offscreen=offscreen,
        silent=silent,
        offscreen_classes=sorted(offscreen_classes),
    )


def sample_vpo_scene(
    rng: np.random.Generator, task: str, classes: int, width: int, height: int, multi_instance: bool
) -> Scene:
    """A VPO image (one frame) with its sounding instances; VPO has no off-screen or silence.

    VPO-SS: 1..4 visible classes, one sounds. VPO-MS (and VPO-MSMI with `multi_instance` false):
    2..4 visible classes, 2..all of them sound. VPO-MSMI with `multi_instance`: 2..3 instances
    of one class (plus 0..1 other object); at least one instance of that class sounds, at least
    one of them stays silent, and two sources sound in all.
    """
    if task == "VPO-SS":
        count = int(rng.integers(1, min(4, classes) + 1))
        class_ids = [int(c) + 1 for c in rng.permutation(classes)[:count]]
        sounding = np.zeros(count, dtype=bool)
        sounding[0] = True
    elif task == "VPO-MS" or not multi_instance:
        count = int(rng.integers(2, min(4, classes) + 1))
        class_ids = [int(c) + 1 for c in rng.permutation(classes)[:count]]
        sounding = np.zeros(count, dtype=bool)
        sounding[rng.permutation(count)[: int(rng.integers(2, count + 1))]] = True
    else:
        repeated = int(rng.integers(classes)) + 1
        copies = int(rng.integers(2, 4))
        others = [int(c) + 1 for c in rng.permutation(classes) if int(c) + 1 != repeated]
        extra = others[: int(rng.integers(0, 2))]
        class_ids = [repeated] * copies + extra
        count = len(class_ids)
        sounding = np.zeros(count, dtype=bool)
        loud = rng.permutation(copies)
        sounding[loud[0]] = True  # one instance of the repeated class sounds ...
        if extra and rng.random() < 0.5:
            sounding[copies] = True  # ... with the other object,
        else:
            sounding[loud[1]] = True  # ... or with a second instance of its class.
        if sounding[:copies].all():
            sounding[loud[-1]] = False
            if extra:
                sounding[copies] = True
        order = rng.permutation(count)
        class_ids = [class_ids[i] for i in order]
        sounding = sounding[order]
    objects = _place_objects(rng, class_ids, width, height, 1)
    return Scene(
        task=task,
        width=width,
        height=height,
        num_frames=1,
        objects=objects,
        sounding=sounding.reshape(1, -1),
        offscreen=[[]],
        silent=[False],
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape test in local coordinates (radius 1)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":
        return (v <= 0.7) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.7)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        return rho <= 0.6 + 0.4 * np.cos(5.0 * phi)
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.3)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if shape == "hexagon":
        au, av = np.abs(u), np.abs(v)
        return (av <= 0.85) & (0.866 * au + 0.5 * av <= 0.9)
    raise ValueError(shape)


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mix factor in [0, 1] between an object's main and secondary colour."""
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "stripes":
        return (np.sin(u * 3.0 * math.pi) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2).astype(np.float32)
    if texture == "dots":
        fu, fv = (u * 2.5) % 1.0 - 0.5, (v * 2.5) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.07).astype(np.float32)
    if texture == "gradient":
        return np.clip((v + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(texture)


def _instance_colours(identity: ClassIdentity, obj: ObjectInstance) -> tuple[np.ndarray, np.ndarray]:
    hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255.0 for c in identity.rgb))
    hue = (hue + obj.hue_shift) % 1.0
    main = colorsys.hsv_to_rgb(hue, saturation, min(1.0, value * obj.shade))
    second = colorsys.hsv_to_rgb(hue, saturation * 0.7, min(1.0, value * obj.shade) * 0.45)
    return np.array(main, np.float32) * 255.0, np.array(second, np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float32 [H, W, 3]: two muted colours mixed by a smooth random field, plus a faint pattern."""
    colours = []
    for _ in range(2):
        hue = float(rng.random())
        rgb = colorsys.hsv_to_rgb(hue, float(rng.uniform(0.05, 0.35)), float(rng.uniform(0.25, 0.75)))
        colours.append(np.array(rgb, np.float32) * 255.0)
    grid = rng.random((int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
    field_image = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    mix = np.clip(np.asarray(field_image, dtype=np.float32), 0.0, 1.0)[..., None]
    canvas = colours[0] * (1.0 - mix) + colours[1] * mix
    pattern = int(rng.integers(4))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    if pattern == 1:  # oblique stripes
        angle = float(rng.uniform(0, math.pi))
        period = float(rng.uniform(6, 20)) * max(width, height) / 224.0
        canvas *= (1.0 + 0.07 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period))[
            ..., None
        ]
    elif pattern == 2:  # faint grid
        step = max(4, int(rng.integers(12, 32) * max(width, height) / 224))
        lines = ((ys.astype(np.int64) % step) == 0) | ((xs.astype(np.int64) % step) == 0)
        canvas *= np.where(lines, 0.88, 1.0).astype(np.float32)[..., None]
    elif pattern == 3:  # soft blobs
        blobs = rng.random((int(rng.integers(8, 16)), int(rng.integers(8, 16)))).astype(np.float32)
        blob_image = Image.fromarray(blobs, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        canvas *= (0.9 + 0.2 * np.asarray(blob_image, dtype=np.float32))[..., None]
    return canvas


def render_scene(
    rng: np.random.Generator, scene: Scene, identities: list[ClassIdentity]
) -> tuple[np.ndarray, np.ndarray]:
    """Frames and instance maps.

    Returns `frames` uint8 [F, H, W, 3] and `owner` int8 [F, H, W] (instance index of the object
    that owns each pixel, -1 for background). Objects are drawn in instance order (later ones in
    front); edges are hard, so `owner` is exactly what the frame shows.
    """
    height, width = scene.height, scene.width
    base = _background(rng, width, height)
    frames = np.empty((scene.num_frames, height, width, 3), dtype=np.uint8)
    owner = np.full((scene.num_frames, height, width), -1, dtype=np.int8)
    colours = [_instance_colours(identities[obj.class_id - 1], obj) for obj in scene.objects]
    for frame in range(scene.num_frames):
        canvas = base * np.float32(1.0 + rng.uniform(-0.03, 0.03))
        for obj, (main, second) in zip(scene.objects, colours, strict=True):
            identity = identities[obj.class_id - 1]
            x, y, radius, angle = obj.pose(frame)
            reach = 1.2 * radius
            x0, x1 = max(0, int(x - reach)), min(width, int(math.ceil(x + reach)) + 1)
            y0, y1 = max(0, int(y - reach)), min(height, int(math.ceil(y + reach)) + 1)
            if x1 <= x0 or y1 <= y0:
                continue
            dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - x)[None, :]
            dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - y)[:, None]
            cos, sin = math.cos(angle), math.sin(angle)
            u = (dx * cos + dy * sin) / radius
            v = (dy * cos - dx * sin) / radius
            inside = _shape_inside(identity.shape, u, v)
            mix = _texture(identity.texture, u, v)[..., None]
            shading = (1.0 - 0.12 * np.clip(u * u + v * v, 0.0, 1.0))[..., None]
            paint = (main * (1.0 - mix) + second * mix) * shading
            window = canvas[y0:y1, x0:x1]
            window[inside] = paint[inside]
            owner[frame, y0:y1, x0:x1][inside] = obj.instance
        canvas += rng.normal(0.0, 3.0, size=canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 255.0, out=canvas)
        frames[frame] = (canvas + 0.5).astype(np.uint8)
    return frames, owner


def instance_stats(owner: np.ndarray, count: int) -> tuple[list[int], list[list[int] | None]]:
    """Per instance of one frame's owner map: visible pixel count and inclusive pixel box
    `[x_min, y_min, x_max, y_max]` (None when not visible)."""
    areas = np.bincount(owner.reshape(-1).astype(np.int64) + 1, minlength=count + 1)[1:]
    boxes: list[list[int] | None] = []
    for instance in range(count):
        if areas[instance] == 0:
            boxes.append(None)
            continue
        rows = np.flatnonzero((owner == instance).any(axis=1))
        cols = np.flatnonzero((owner == instance).any(axis=0))
        boxes.append([int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])])
    return [int(a) for a in areas[:count]], boxes


# --------------------------------------------------------------------------------------------
# Sound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoundParams:
    """Per-instance jitter of a class's sound."""

    pitch: float  # multiplicative factor on the timbre's frequencies / rates
    gain_db: float
    phase: float
    seed: int


def sample_sound_params(rng: np.random.Generator) -> SoundParams:
    return SoundParams(
        pitch=float(2.0 ** rng.uniform(-0.05, 0.05)),
        gain_db=float(rng.uniform(-6.0, 0.0)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        seed=int(rng.integers(2**31)),
    )


def _band_limit(signal: np.ndarray, sample_rate: int, band: tuple[float, float]) -> np.ndarray:
    """Keep only `band` (with short raised-cosine edges inside it)."""
    spectrum = np.fft.rfft(signal)
    freqs = np.fft.rfftfreq(signal.shape[-1], 1.0 / sample_rate)
    low, high = band
    taper = 0.06 * (high - low)
    gain = np.clip((freqs - low) / taper, 0.0, 1.0) * np.clip((high - freqs) / taper, 0.0, 1.0)
    gain = 0.5 - 0.5 * np.cos(np.pi * gain)
    return np.fft.irfft(spectrum * gain, n=signal.shape[-1]).astype(np.float32)


def class_sound(identity: ClassIdentity, params: SoundParams, samples: int, sample_rate: int) -> np.ndarray:
    """float32 [samples]: the class's timbre with this instance's jitter, RMS `SOURCE_RMS` before
    its gain, band-limited to `identity.band_hz`."""
    rng = np.random.default_rng(params.seed)
    t = np.arange(samples, dtype=np.float64) / sample_rate
    low, high = identity.band_hz
    width = high - low
    centre = math.sqrt(low * high) * params.pitch
    centre = min(max(centre, low + 0.2 * width), high - 0.2 * width)
    timbre = identity.timbre
    index = identity.class_id - 1
    if timbre == "harmonic":
        partials = 3 + index % 3
        f0 = width / (partials + 1.0) * params.pitch
        first = math.ceil(low / f0)
        signal = np.zeros(samples)
        for rank, multiple in enumerate(range(first, first + partials + 2)):
            frequency = multiple * f0
            if frequency >= high:
                break
            signal += np.sin(2 * math.pi * frequency * t + params.phase * rank) / (1.0 + rank) ** (0.5 + index % 2)
    elif timbre in ("noise", "pulsed-noise"):
        signal = rng.standard_normal(samples)
        if timbre == "pulsed-noise":
            rate = (3.0 + index % 4) * params.pitch
            gate = 0.5 + 0.5 * np.tanh(8.0 * np.sin(2 * math.pi * rate * t + params.phase))
            signal = signal * gate
    elif timbre == "chirp":
        period = (0.2 + 0.06 * (index % 5)) / params.pitch
        sweep = (t / period) % 1.0
        f_lo, f_hi = low + 0.1 * width, high - 0.1 * width
        frequency = f_lo + (f_hi - f_lo) * sweep
        signal = np.sin(2 * math.pi * np.cumsum(frequency) / sample_rate + params.phase)
    elif timbre == "clicks":
        rate = (7.0 + 2.0 * (index % 6)) * params.pitch
        local = (t + params.phase / (2 * math.pi * rate)) % (1.0 / rate)
        tau = max(0.004, 2.0 / width)
        signal = np.exp(-local / tau) * np.sin(2 * math.pi * centre * local)
    elif timbre == "am-tone":
        rate = (3.0 + 1.5 * (index % 5)) * params.pitch
        rate = min(rate, 0.2 * width)
        signal = np.sin(2 * math.pi * centre * t) * (1.0 + 0.9 * np.sin(2 * math.pi * rate * t + params.phase))
    elif timbre == "vibrato":
        rate = (5.0 + index % 3) * params.pitch
        depth = 0.25 * width
        signal = np.sin(2 * math.pi * centre * t + (depth / rate) * np.sin(2 * math.pi * rate * t + params.phase))
    elif timbre == "two-tone":
        step = (0.22 + 0.05 * (index % 4)) / params.pitch
        high_tone = ((t / step) % 2.0) >= 1.0
        frequency = np.where(high_tone, low + 0.72 * width, low + 0.3 * width)
        signal = np.sin(2 * math.pi * np.cumsum(frequency) / sample_rate + params.phase)
    else:
        raise ValueError(timbre)
    signal = _band_limit(signal.astype(np.float32), sample_rate, identity.band_hz)
    rms = float(np.sqrt(np.mean(signal.astype(np.float64) ** 2))) or 1.0
    return (signal * np.float32(SOURCE_RMS / rms * 10.0 ** (params.gain_db / 20.0))).astype(np.float32)


def gate(active: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 [seconds * rate]: 1 in active seconds, 0 elsewhere, with `RAMP_S` fades placed
    inside the active seconds (so inactive seconds get no energy at all)."""
    per_second = sample_rate
    envelope = np.repeat(active.astype(np.float32), per_second)
    ramp = max(1, int(RAMP_S * sample_rate))
    fade = (0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, ramp, dtype=np.float32))).astype(np.float32)
    for second, on in enumerate(active):
        if not on:
            continue
        start = second * per_second
        if second == 0 or not active[second - 1]:
            envelope[start : start + ramp] *= fade
        if second == len(active) - 1 or not active[second + 1]:
            envelope[start + per_second - ramp : start + per_second] *= fade[::-1]
    return envelope


def ambience(rng: np.random.Generator, samples: int, sample_rate: int) -> np.ndarray:
    """Faint broadband hiss (the noise floor of a real recording)."""
    hiss = _band_limit(rng.standard_normal(samples).astype(np.float32), sample_rate, (60.0, 7600.0))
    rms = float(np.sqrt(np.mean(hiss.astype(np.float64) ** 2))) or 1.0
    return (hiss * np.float32(AMBIENCE_RMS / rms)).astype(np.float32)


def scene_audio(
    rng: np.random.Generator,
    scene: Scene,
    identities: list[ClassIdentity],
    sample_rate: int,
) -> np.ndarray:
    """float32 [seconds * rate] of an AVS video: the sounding objects and off-screen classes of
    each second, plus ambience. Mixed without clipping (scaled down when the peak exceeds 0.95)."""
    seconds = scene.num_frames
    samples = seconds * sample_rate
    mix = ambience(rng, samples, sample_rate)
    for obj in scene.objects:
        params = sample_sound_params(rng)
        active = scene.sounding[:, obj.instance]
        if active.any():
            mix += class_sound(identities[obj.class_id - 1], params, samples, sample_rate) * gate(active, sample_rate)
    for class_id in scene.offscreen_classes:
        params = sample_sound_params(rng)
        active = np.array([class_id in scene.offscreen[f] for f in range(seconds)])
        if active.any():
            mix += class_sound(identities[class_id - 1], params, samples, sample_rate) * gate(active, sample_rate)
    peak = float(np.max(np.abs(mix)))
    if peak > 0.95:
        mix *= np.float32(0.95 / peak)
    return mix


def band_energy(audio: np.ndarray, sample_rate: int, band: tuple[float, float]) -> float:
    """Mean power of `audio` inside `band` (Hz), from its spectrum (Parseval)."""
    spectrum = np.fft.rfft(audio.astype(np.float64))
    freqs = np.fft.rfftfreq(audio.shape[-1], 1.0 / sample_rate)
    inside = (freqs >= band[0]) & (freqs <= band[1])
    return float(2.0 * np.sum(np.abs(spectrum[inside]) ** 2) / audio.shape[-1] ** 2)
