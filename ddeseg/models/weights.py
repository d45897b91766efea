"""Loading weights into a `DDESeg` from every checkpoint format users bring.

| format           | recognised by                                   | goes to            |
|------------------|-------------------------------------------------|--------------------|
| `ddeseg`         | keys `audio_model.*` / `aud_enhancer.*` / ...   | the whole model    |
|                  | (ours, and official `{'model': ...}` files, with or without DDP's `module.`) |  |
| `mmseg-backbone` | `{'state_dict'}` with `backbone.*` (SegFormer); `decode_head.*` etc. dropped | `backbone` |
| `mit`            | bare MiT keys (`patch_embed1.*`, `block1.*`; ImageNet `head.*` unexpected)   | `backbone` |
| `htsat-lightning`| `sed_model.*` keys (HTS-AT Lightning checkpoints)                            | `audio_model` |
| `htsat`          | bare HTS-AT keys (`layers.*`, `patch_embed.*`, `bn0.*`, ...)                  | `audio_model` |

Everything is read with `torch.load(weights_only=True)` (numpy arrays, found in some old MiT
files, are allowed as plain data). Keys whose shape differs from the model's (e.g. the HTS-AT
AudioSet head with 527 classes) are skipped and reported as `mismatched`; `missing` is counted
within the part the format targets. Zero loaded keys is a `CheckpointError`, never a warning.

HTS-AT and full checkpoints carry `logmel_extractor.melW`: loading them replaces the model's mel
filterbank, which is how the official pipeline got a valid filterbank despite its `fmax: 50`.
Use `model.frontend()` (not a fresh `LogMelFrontend(cfg)`) to compute log-mels with it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddeseg.errors import CheckpointError

# decode_head.* alone does not make a full checkpoint: SegFormer (mmseg) files have one too.
FULL_PREFIXES = ("audio_model.", "aud_enhancer.", "memory_bank", "backbone.av_aligners.", "backbone.aud_projs.")
MIT_PREFIXES = ("patch_embed1.", "block1.", "norm1.")
HTSAT_PREFIXES = ("layers.", "patch_embed.", "bn0.", "spectrogram_extractor.", "logmel_extractor.", "tscam_conv.")


@dataclass
class LoadReport:
    """What a `load_checkpoint` call did. Keys are the model's names, except `unexpected`."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys of the targeted part not in the file
    unexpected: list[str] = field(default_factory=list)  # file keys (file names) the model does not have
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model
    filterbank_replaced: bool = False

    def summary(self) -> str:
        """One line: format, counts, and the first few problem keys."""

        def first(keys: list[str]) -> str:
            return "" if not keys else " (" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + ")"

        text = (
            f"{self.format}: loaded {len(self.loaded)}, missing {len(self.missing)}{first(self.missing)}, "
            f"unexpected {len(self.unexpected)}{first(self.unexpected)}, "
            f"shape-mismatched {len(self.mismatched)}{first([m[0] for m in self.mismatched])}"
        )
        return text + ("; mel filterbank replaced" if self.filterbank_replaced else "")


def _numpy_safe_globals() -> list[Any]:
    """The numpy types a pickled ndarray needs, for `torch.serialization.safe_globals`."""
    core = getattr(np, "_core", None) or np.core
    types: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    types += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_)]
    return types


# What a file that is not a checkpoint starts with, to say what it is instead.
FILE_SIGNATURES = (
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"PAR1", "a Parquet table"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
ZIP_END_MAGIC = b"PK\x05\x06"  # the end-of-central-directory record, in the last 64 KiB + 22 bytes
ZIP_TAIL_BYTES = (1 << 16) + 22


def _file_kind(path: Path) -> str | None:
    """What the file looks like when it is not a PyTorch checkpoint (None: it could be one)."""
    with path.open("rb") as file:
        head = file.read(512)
    if head.startswith(ZIP_MAGIC) or head.startswith(b"\x80"):  # zip, or a pickle (pre-1.6 torch.save)
        return None
    for magic, kind in FILE_SIGNATURES:
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return "a text file, e.g. a YAML config"


def _torch_reason(error: Exception) -> str:
    """The useful part of a `torch.load` error, on one line and without PyTorch's advice to retry
    with `weights_only=False` (which would run the file's code: never for a file from elsewhere)."""
    text = " ".join(str(error).split())
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return f"it holds a pickled Python object ({unsupported.group(1)}), which a weights-only load refuses"
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the| Please file an issue|$)", text)
    if detail:
        text = detail.group(1)
    if "weights_only" in text or not text:  # only PyTorch's advice left: name the error instead
        text = type(error).__name__
    return text[:200]


def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The one safe `torch.load` of ddeseg: `weights_only=True` always (numpy arrays allowed as
    plain data), and every failure one `CheckpointError` line that names the file and says what
    it is instead (a text file, a .npy, random bytes, a truncated file, a folder, ...).

    Used for every checkpoint a user passes (evaluate, predict, train --init/--resume,
    --audio-checkpoint of prepare and build-memory-bank)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; pass the .pt/.pth file in it (e.g. RUN_DIR/best.pt)")
    try:
        size = path.stat().st_size
        kind = _file_kind(path) if size else "an empty file (0 bytes)"
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if kind is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({kind}); pass a .pt/.pth file written by torch.save")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the unpickler hits, the file is the problem
        reason = _torch_reason(error)
    truncated = _truncation(path, reason)
    if truncated is not None:
        raise CheckpointError(f"{path}: a truncated or corrupt PyTorch checkpoint ({truncated}); copy or download it again")
    raise CheckpointError(
        f"{path}: cannot be read as a weights-only PyTorch checkpoint ({reason}); "
        "re-save it as a plain state dict of tensors"
    )


def _truncation(path: Path, reason: str) -> str | None:
    """Why a file that starts like a checkpoint looks cut short (None: it does not)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        is_zip = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        file.seek(max(0, size - ZIP_TAIL_BYTES))
        tail = file.read()
    if is_zip and ZIP_END_MAGIC not in tail:  # a whole zip ends with its central directory's end record
        return f"{size} bytes, the zip archive has no end record"
    if is_zip and ("central directory" in reason or "failed reading zip archive" in reason):
        return f"{size} bytes, {reason}"
    if reason in ("EOFError", "Ran out of input") or "pickle data was truncated" in reason:
        return f"{size} bytes, the data ends early"
    return None


def _state_dict_of(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint payload (`model`, `state_dict` or the dict itself)."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{source}: expected a dict, got {type(payload).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    state = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if torch.is_tensor(value):
            state[str(key)] = value
    if not state:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {sorted(map(str, payload))[:8]})")
    if all(key.startswith("module.") for key in state):  # saved from a DDP-wrapped model
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _translate(state: dict[str, torch.Tensor], source: str) -> tuple[str, str, dict[str, str], list[str]]:
    """Detect the format. Returns (format, model prefix it targets, {model key: file key} of the
    keys it maps, file keys it drops on purpose)."""
    keys = list(state)

    def has(prefixes: tuple[str, ...]) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def mapped(strip: str, add: str) -> tuple[dict[str, str], list[str]]:
        names = {add + k[len(strip) :]: k for k in keys if k.startswith(strip)}
        return names, [k for k in keys if not k.startswith(strip)]

    if has(("sed_model.",)):
        return "htsat-lightning", "audio_model.", *mapped("sed_model.", "audio_model.")
    if has(FULL_PREFIXES):
        return "ddeseg", "", *mapped("", "")
    if has(("backbone.",)):
        return "mmseg-backbone", "backbone.", *mapped("backbone.", "backbone.")
    if has(MIT_PREFIXES):
        return "mit", "backbone.", *mapped("", "backbone.")
    if has(HTSAT_PREFIXES):
        return "htsat", "audio_model.", *mapped("", "audio_model.")
    raise CheckpointError(
        f"{source}: no key matches a DDESeg, MiT/SegFormer or HTS-AT checkpoint (first keys: {keys[:5]})"
    )


def load_checkpoint(
    model: nn.Module, path_or_state: str | Path | dict[str, Any], strict: bool = False
) -> LoadReport:
    """Load any supported checkpoint (see the module docstring) into `model` (a `DDESeg`).

    Args:
        model: the model; modified in place (also its memory bank, when the file has one).
        path_or_state: a file path, or an already loaded payload / state dict.
        strict: also raise when anything in the targeted part is missing, unexpected or of another
            shape (a full official checkpoint into the matching config loads strictly).
    Returns:
        a `LoadReport`. Raises `CheckpointError` when nothing matches.
    """
    source = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "<state dict>"
    payload = read_checkpoint_file(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    state = _state_dict_of(payload, source)
    fmt, prefix, names, dropped = _translate(state, source)

    bank_key = "memory_bank"
    has_bank = bank_key in names
    if has_bank:
        model.set_memory_bank(state[names.pop(bank_key)])  # before the shape check: its size may differ
    own = model.state_dict()
    report = LoadReport(source=source, format=fmt)
    accepted = {}
    for key, file_key in names.items():
        value = state[file_key]
        if key not in own:
            report.unexpected.append(file_key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            accepted[key] = value
    # mmseg's decode head (a SegFormer head trained on another dataset) is dropped on purpose
    report.unexpected += [k for k in dropped if not k.startswith("decode_head.")]
    report.missing = [k for k in own if k.startswith(prefix) and k not in names and k != bank_key]
    if not accepted:
        raise CheckpointError(
            f"{source}: detected as {fmt} but no key matches the model ({report.summary()}); "
            "is it a checkpoint of another architecture or size?"
        )
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(f"{source}: strict load failed: {report.summary()}")
    with torch.no_grad():
        for key, value in accepted.items():
            own[key].copy_(value.to(own[key].dtype))
    report.loaded = [key for key in own if key in accepted]
    if has_bank:
        report.loaded.insert(0, bank_key)
    report.filterbank_replaced = any(key.endswith("logmel_extractor.melW") for key in accepted)
    return report


def frontend_state_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The audio front end stored in an HTS-AT or full DDESeg checkpoint (any format above,
    with or without `module.`), keyed as in `LogMelFrontend.state_dict()`.

    Returns `logmel_extractor.melW` `[n_fft/2+1, mel_bins]` and, where the file has them, the STFT
    kernels `spectrogram_extractor.stft.conv_{real,imag}.weight`: what `load_checkpoint` would put
    into the model's front end. Raises `CheckpointError` when the file has no filterbank.
    """
    source = str(path)
    state = _state_dict_of(read_checkpoint_file(path), source)
    fmt, _, names, _ = _translate(state, source)
    prefix = "audio_model."
    frontend = {
        key[len(prefix) :]: state[file_key].detach().clone()
        for key, file_key in names.items()
        if key.startswith(prefix + "logmel_extractor.") or key.startswith(prefix + "spectrogram_extractor.")
    }
    if "logmel_extractor.melW" not in frontend:
        raise CheckpointError(
            f"{source}: a {fmt} checkpoint without an audio front end (no logmel_extractor.melW); "
            "pass an HTS-AT or full DDESeg checkpoint, or leave the filterbank to the config"
        )
    return frontend
