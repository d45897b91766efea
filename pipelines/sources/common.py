"""What every raw-layout reader shares: the `Source` base class and registry, safe paths, csv
reading, and the loaders that turn files into a `FrameRecord` (image bytes, class-id mask, audio).

Rules every reader follows (see also `ddeseg.pipelines.records`):
- A path named by a csv/json file is joined to the root, resolved (symlinks followed) and must
  stay inside the resolved root; otherwise the frame is rejected ("escapes the dataset root").
- Image bytes are kept as stored; they are fully decoded once only to prove they are readable.
- Audio is read with soundfile (never torchaudio, never a pickle), averaged to mono, resampled
  with soxr's high-quality filter (librosa's default) and made `clip_samples` long by repeating
  it (the official `_wav_repeat`) or cutting it.
"""

from __future__ import annotations

import csv
import importlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from ddeseg.audio import fit_length, mix_to_mono, resample
from ddeseg.classes import avss_palette
from ddeseg.config import Config
from ddeseg.data.schema import IGNORE_INDEX
from ddeseg.errors import DataError
from ddeseg.pipelines.records import (
    AudioSpec,
    ClassList,
    FrameRecord,
    FrameRef,
    MaskSpec,
    RecordError,
    Reject,
)

# layout name -> "module:Class"; imported on demand so that one reader's import cost or error
# does not reach the others.
SOURCES = {
    "avsbench": "ddeseg.pipelines.sources.avsbench:AVSBenchSource",
    "ddeseg": "ddeseg.pipelines.sources.ddeseg_layout:DDESegLayoutSource",
    "vpo": "ddeseg.pipelines.sources.vpo:VPOSource",
}

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png"}
UNKNOWN = -1  # lookup-table value of a mask value that is no known class


def open_source(
    layout: str,
    root: str | Path,
    tasks: list[str] | None,
    config: Config,
    options: dict[str, Any] | None = None,
) -> Source:
    """The reader for `layout` over `root`, limited to `tasks` (None: every task found).

    `options`: layout-specific choices (`avsbench`: `part` = auto | semantic | object)."""
    if layout not in SOURCES:
        raise DataError(f"unknown layout {layout!r}; choose one of {sorted(SOURCES)}")
    module_name, class_name = SOURCES[layout].split(":")
    source_class = getattr(importlib.import_module(module_name), class_name)
    return source_class(Path(root), tasks, config, options)


# --------------------------------------------------------------------------------------------
# Paths and metadata files
# --------------------------------------------------------------------------------------------


def safe_path(root: Path, relative: str) -> Path:
    """`root / relative`, resolved; a `RecordError` when it leaves the (resolved) root."""
    if not relative or "\x00" in relative:
        raise RecordError(repr(relative), "empty or invalid path in the metadata")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise RecordError(relative, f"path escapes the dataset root {root} (resolves to {resolved})")
    return resolved


class CsvRows(list):
    """`(line number, cells)` rows of a csv; `bad` lists `(line number, reason)` of the rows that
    could not be read (not UTF-8, broken quoting): each is one reject, never the whole file."""

    def __init__(self, rows: list[tuple[int, Any]] = (), bad: list[tuple[int, str]] | None = None):
        super().__init__(rows)
        self.bad: list[tuple[int, str]] = list(bad or [])


def _decode_line(raw: bytes, first: bool) -> str:
    """One physical line as text; UnicodeDecodeError when it is not UTF-8 (a BOM is dropped)."""
    return raw.decode("utf-8-sig" if first else "utf-8")


def read_csv(path: Path, skip_header: bool = True) -> CsvRows:
    """Rows of a csv as `(line number, cells)`, blank rows dropped, cells stripped.

    Read line by line (the metadata files of every layout have one record per line): a line that
    is not UTF-8 (a file name in another encoding) or not valid csv goes to `.bad` with its
    line number, and every other row is still read. With `skip_header`, the first non-blank
    line is dropped whether it is readable or not. An unreadable file is a DataError."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the csv ({error.strerror or error})") from None
    rows = CsvRows()
    header_seen = not skip_header
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            text = _decode_line(raw, number == 1)
        except UnicodeDecodeError as error:
            reason = f"row is not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            cells: list[str] | None = None
        else:
            try:
                cells = [cell.strip() for cell in next(csv.reader([text]), [])]
            except csv.Error as error:
                reason, cells = f"row is not valid csv ({error})", None
            if cells is not None and not any(cells):
                continue  # blank row
        if not header_seen:
            header_seen = True
            continue
        if cells is None:
            rows.bad.append((number, reason))
        else:
            rows.append((number, cells))
    return rows


def read_csv_header(path: Path) -> tuple[list[str], CsvRows]:
    """The header cells and the rows after it (unreadable rows in `.bad`); an empty csv or an
    unreadable header is a DataError (no column can be found without it)."""
    rows = read_csv(path, skip_header=False)
    if rows.bad and (not rows or rows.bad[0][0] < rows[0][0]):
        line, reason = rows.bad[0]
        raise DataError(f"{path}:{line}: the header {reason}; fix the header line")
    if not rows:
        raise DataError(f"{path}: empty csv")
    return rows[0][1], CsvRows(rows[1:], rows.bad)


def read_csv_dicts(path: Path, required: tuple[str, ...]) -> CsvRows:
    """Rows of a csv with a header as `(line number, {column: cell})` (unreadable rows in `.bad`);
    an empty csv, an unreadable header or missing columns are a DataError."""
    header, rows = read_csv_header(path)
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {header}")
    return CsvRows([(number, dict(zip(header, cells, strict=False))) for number, cells in rows], rows.bad)


def find_file(root: Path, name: str, max_depth: int = 2) -> Path | None:
    """The shallowest `name` under `root` (depth <= max_depth), deterministic on ties."""
    for depth in range(max_depth + 1):
        pattern = "/".join(["*"] * depth + [name])
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


def relative(root: Path, path: Path) -> str:
    """`path` relative to `root` in posix form ("." for the root itself)."""
    return path.relative_to(root).as_posix()


def join(*parts: str) -> str:
    """Posix join of relative path parts, dropping "." parts (`join(".", "v2", "a")` -> `v2/a`)."""
    return "/".join(part for part in parts if part not in ("", "."))


# --------------------------------------------------------------------------------------------
# File loaders
# --------------------------------------------------------------------------------------------


def read_bytes(root: Path, relative_path: str, what: str) -> bytes:
    path = safe_path(root, relative_path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RecordError(relative_path, f"missing {what} file") from None
    except OSError as error:
        raise RecordError(relative_path, f"unreadable {what} file ({error.strerror or error})") from None


def read_image(root: Path, relative_path: str) -> tuple[bytes, str, int, int]:
    """Original bytes, extension (from the content), height and width of a frame."""
    data = read_bytes(root, relative_path, "image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()  # a truncated or corrupt file fails here
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RecordError(relative_path, f"corrupt image ({error})") from None
    if image_format not in IMAGE_FORMATS:
        raise RecordError(relative_path, f"unsupported image format {image_format} (JPEG or PNG expected)")
    if width == 0 or height == 0:
        raise RecordError(relative_path, "image has zero size")
    return data, IMAGE_FORMATS[image_format], height, width


def _open_mask(data: bytes, relative_path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RecordError(relative_path, f"corrupt mask ({error})") from None


def _single_channel(image: Image.Image, relative_path: str) -> np.ndarray:
    """Stored values of a single-channel mask (palette PNGs give their indices)."""
    if image.mode in ("1", "L", "P"):
        return np.asarray(image).astype(np.uint8)
    if image.mode in ("I", "I;16", "I;16B"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 255:
            raise RecordError(relative_path, f"mask values {values.min()}..{values.max()} exceed 8 bits")
        return values.astype(np.uint8)
    raise RecordError(
        relative_path, f"mask has mode {image.mode!r}; expected a single-channel PNG of class ids"
    )


def decode_binary_mask(image: Image.Image, relative_path: str, foreground_id: int) -> np.ndarray:
    values = _single_channel(image, relative_path)
    present = set(np.unique(values).tolist())
    if present <= {0, 255}:
        foreground = values == 255
    elif present <= {0, 1}:
        foreground = values == 1
    else:
        odd = sorted(present - {0, 1, 255})[:5]
        raise RecordError(relative_path, f"binary mask has values {odd} besides 0/255 (unknown colour)")
    return np.where(foreground, np.uint8(foreground_id), np.uint8(0))


def decode_palette_mask(
    image: Image.Image, relative_path: str, palette: np.ndarray, lut: np.ndarray
) -> np.ndarray:
    """RGB colour mask -> unified ids; `palette[j]` is the colour of raw id j, `lut[j]` its unified id."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    palette_codes = (
        (palette[:, 0].astype(np.int32) << 16) | (palette[:, 1].astype(np.int32) << 8) | palette[:, 2]
    )
    order = np.argsort(palette_codes, kind="stable")
    sorted_codes = palette_codes[order]
    position = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    known = sorted_codes[position] == codes
    if not known.all():
        bad = int(codes[~known][0])
        colour = ((bad >> 16) & 255, (bad >> 8) & 255, bad & 255)
        raise RecordError(
            relative_path,
            f"unknown class colour RGB{colour} in {int((~known).sum())} pixel(s) (not in the {len(palette)}-class palette)",
        )
    return lut[order[position]].astype(np.uint8)


def decode_index_mask(
    image: Image.Image, relative_path: str, lut: np.ndarray, what: str = "class id"
) -> np.ndarray:
    """Single-channel ids -> unified ids through `lut` (int16 [256], UNKNOWN for an unknown id)."""
    values = _single_channel(image, relative_path)
    mapped = lut[values]
    if (mapped == UNKNOWN).any():
        unknown = sorted(set(values[mapped == UNKNOWN].tolist()))[:5]
        raise RecordError(relative_path, f"unknown {what}(s) {unknown} in the mask")
    return mapped.astype(np.uint8)


def read_wav(
    root: Path, relative_path: str, spec: AudioSpec, sample_rate: int, clip_seconds: float
) -> np.ndarray:
    """One file's window (`spec.window`) as mono float32 at `sample_rate`, not yet length-fixed."""
    path = safe_path(root, relative_path)
    if not path.is_file():
        raise RecordError(relative_path, "missing audio file")
    try:
        info = soundfile.info(str(path))
        rate = info.samplerate
        if spec.window == "second":
            start = int(round(spec.start_s * rate))
            data, _ = soundfile.read(
                str(path), start=start, stop=start + rate, dtype="float32", always_2d=True
            )
        else:
            data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, OSError, ValueError) as error:
        raise RecordError(relative_path, f"corrupt audio ({error})") from None
    if data.shape[0] == 0:
        where = f" at second {spec.start_s:g}" if spec.window == "second" else ""
        raise RecordError(relative_path, f"empty audio{where}")
    wave = mix_to_mono(data)
    if not np.isfinite(wave).all():
        raise RecordError(relative_path, "audio has NaN or infinite samples")
    if spec.window == "centre":
        # CAVP's crop (before its resampling, which here comes next): `spec.crop_s` centred
        length = int(round(spec.crop_s * rate))
        start = max(wave.shape[0] // 2 - length // 2, 0)
        wave = wave[start : start + length]
    return resample(wave, rate, sample_rate)


def read_audio(root: Path, spec: AudioSpec, sample_rate: int, clip_seconds: float) -> np.ndarray:
    """A frame's audio: float32 `[round(clip_seconds * sample_rate)]`, mono."""
    samples = int(round(clip_seconds * sample_rate))
    waves = [
        fit_length(read_wav(root, path, spec, sample_rate, clip_seconds), samples) for path in spec.paths
    ]
    if spec.pan is None:
        mixed = np.sum(waves, axis=0, dtype=np.float64) if len(waves) > 1 else waves[0]
    else:
        # CAVP stereo: each source panned to [left (1 - p), right p], sources summed; then
        # mixed down to mono (mean of the two channels) for our mono front end.
        left = sum((1.0 - pos) * wave.astype(np.float64) for pos, wave in zip(spec.pan, waves, strict=True))
        right = sum(pos * wave.astype(np.float64) for pos, wave in zip(spec.pan, waves, strict=True))
        mixed = (left + right) / 2.0
    return np.asarray(mixed, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The reader base class
# --------------------------------------------------------------------------------------------


class Source:
    """A raw dataset layout: `scan()` the metadata into `FrameRef`s, `load()` one frame.

    Subclasses set `layout` and `tasks_supported`, fill `self.classes`, `self.palette`,
    `self.palette_lut`, `self.index_lut` / `self.coco_lut` as their masks need, and implement
    `discover()` (which tasks exist under the root) and `scan()`.
    """

    layout = ""
    tasks_supported: tuple[str, ...] = ()

    def __init__(
        self, root: Path, tasks: list[str] | None, config: Config, options: dict[str, Any] | None = None
    ):
        self.root = root.expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"dataset root {root} is not a directory")
        self.sample_rate = config.model.frontend.sample_rate
        self.clip_seconds = config.data.clip_seconds
        self.vpo_audio = config.data.vpo_audio
        if self.vpo_audio not in ("mono", "stereo"):
            raise DataError(f"data.vpo_audio must be mono or stereo, got {self.vpo_audio!r}")
        self.options = dict(options or {})
        self.set_avss_classes(ClassList())
        self.coco_lut = np.full(256, UNKNOWN, dtype=np.int16)
        found = self.discover()
        if tasks is None:
            self.tasks = [task for task in self.tasks_supported if task in found]
            if not self.tasks:
                raise DataError(f"no {self.layout} dataset found under {self.root}: {self.expected_files()}")
        else:
            bad = [task for task in tasks if task not in self.tasks_supported]
            if bad:
                raise DataError(
                    f"task(s) {bad} do not exist in the {self.layout} layout; choose from {list(self.tasks_supported)}"
                )
            missing = [task for task in tasks if task not in found]
            if missing:
                raise DataError(f"no data for task(s) {missing} under {self.root}: {self.expected_files()}")
            self.tasks = [task for task in self.tasks_supported if task in tasks]

    def set_avss_classes(self, classes: ClassList) -> None:
        """Use `classes` as the unified list (AVSS colours and ids are its first `avss_count` ids)
        and rebuild every lookup table that depends on it."""
        self.classes = classes
        self.palette = avss_palette(classes.avss_count)
        self.palette_lut = np.arange(classes.avss_count, dtype=np.int16)
        self.index_lut = np.full(256, UNKNOWN, dtype=np.int16)
        self.index_lut[: classes.avss_count] = np.arange(classes.avss_count)
        self.vpo_lut = np.full(256, UNKNOWN, dtype=np.int16)  # VPO class index -> unified id
        self.vpo_lut[: len(classes.vpo_ids)] = classes.vpo_ids
        self.vpo_lut[IGNORE_INDEX] = IGNORE_INDEX

    # -- to implement ---------------------------------------------------------------------

    def discover(self) -> dict[str, Any]:
        """Tasks present under the root -> whatever the reader needs to read them."""
        raise NotImplementedError

    def expected_files(self) -> str:
        """One line for error messages: which metadata files this layout looks for."""
        raise NotImplementedError

    def scan(self) -> Iterator[FrameRef | Reject]:
        """Every frame of the selected tasks, or a `Reject` for a metadata row that cannot be used.

        Must leave `self.classes` final (call `self.classes.finalize()` at the end)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------

    def bad_rows(self, csv_path: Path, rows: CsvRows) -> Iterator[Reject]:
        """One reject per unreadable row of `csv_path` (`file.csv:LINE`, relative to the root)."""
        name = relative(self.root, csv_path)
        for line, reason in rows.bad:
            yield Reject(f"{name}:{line}", reason)

    def describe(self) -> dict[str, Any]:
        """What this reader found, for `prepare.json`."""
        return {"layout": self.layout, "root": str(self.root), "tasks": list(self.tasks)}

    def read_mask(self, spec: MaskSpec) -> tuple[np.ndarray | None, str | None]:
        for relative_path, kind in spec.candidates:
            path = safe_path(self.root, relative_path)
            if not path.is_file():
                continue
            image = _open_mask(read_bytes(self.root, relative_path, "mask"), relative_path)
            with image:
                if kind == "binary":
                    foreground_id = self.classes.id_of(spec.foreground)
                    return decode_binary_mask(image, relative_path, foreground_id), relative_path
                if kind == "palette":
                    return decode_palette_mask(
                        image, relative_path, self.palette, self.palette_lut
                    ), relative_path
                if kind == "index":
                    return decode_index_mask(image, relative_path, self.index_lut), relative_path
                if kind == "vpo":
                    return decode_index_mask(
                        image, relative_path, self.vpo_lut, "VPO class id"
                    ), relative_path
                if kind == "coco":
                    return decode_index_mask(
                        image, relative_path, self.coco_lut, "COCO category id"
                    ), relative_path
                raise ValueError(f"unknown mask kind {kind!r}")
        if spec.optional:
            return None, None
        raise RecordError(spec.candidates[0][0], "missing mask file")

    def load(self, ref: FrameRef) -> FrameRecord:
        """Read one frame; raises `RecordError(path, reason)` for anything unusable."""
        image_bytes, image_ext, height, width = read_image(self.root, ref.image)
        mask, mask_path = (None, None) if ref.mask is None else self.read_mask(ref.mask)
        if mask is not None and mask.shape != (height, width):
            raise RecordError(
                mask_path or "",
                f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its frame {ref.image} ({width}x{height})",
            )
        audio = read_audio(self.root, ref.audio, self.sample_rate, self.clip_seconds)
        sounding = mask is not None and bool(((mask != 0) & (mask != IGNORE_INDEX)).any())
        if sounding and not np.any(audio):
            raise RecordError(
                ";".join(ref.audio.paths), "audio is all zeros but the mask has sounding pixels"
            )
        source = {"layout": self.layout, "image": ref.image, "audio": ";".join(ref.audio.paths)}
        if mask_path is not None:
            source["mask"] = mask_path
        return FrameRecord(
            ref=ref,
            image_bytes=image_bytes,
            image_ext=image_ext,
            height=height,
            width=width,
            mask=mask,
            audio=audio,
            source=source,
        )

    def records(self) -> Iterator[FrameRecord | Reject]:
        """Scan and load everything in order (for tests and small inspections; `prepare` shards it).

        The scan completes first: the class list is final only then."""
        for item in list(self.scan()):
            if isinstance(item, Reject):
                yield item
                continue
            try:
                yield self.load(item)
            except RecordError as error:
                yield Reject(error.path, error.reason, item.key)
