"""Audio-reliance controls: the model sees each frame with other audio, and the drop from the
normal score (`none`: no control, the frame's own audio; reports call it `normal`) says how much it
uses sound (`eval.audio_control`).

- `shuffled`: each frame gets the log-mel of another frame of its batch: frame i takes frame
  i + 1's (cyclically), a derangement for any batch of two or more. A batch of one frame takes
  the first frame of the previous batch on its rank; a rank's first batch, when it holds one
  frame, takes the next batch's. A rank that holds a single frame in all keeps its own audio
  (counted in `audio_control_unchanged_frames`). The numbers thus depend on how frames are
  batched (batch size, number of ranks), but not on anything random.
- `silent`: the log-mel of a zero waveform, computed by the model's own front end
  (`LogMelFrontend`): -100 dB everywhere (its floor), not zeros, which would be a loud 0 dB.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ddeseg.config import STAGE_KEY_CHOICES, Config
from ddeseg.errors import DDESegError

if TYPE_CHECKING:
    pass

AUDIO_CONTROLS = STAGE_KEY_CHOICES["eval.audio_control"]


def silent_logmel(model: torch.nn.Module, config: Config, frames: int, mel_bins: int) -> torch.Tensor:
    """float32 `[frames, mel_bins]` (CPU): the log-mel of a zero waveform by the model's front end.

    Uses the model's own front end (`DDESeg.frontend()`, or its `Spectrogram` and
    `LogMelFilterBank` modules), so a filterbank loaded from a checkpoint is the one used; a
    model without one gets a `LogMelFrontend` built from `config.model.frontend`. The waveform is long enough for `frames` frames.
    """
    from ddeseg.models.frontend import LogMelFilterBank, LogMelFrontend, Spectrogram

    if callable(getattr(model, "frontend", None)):
        frontend = model.frontend()  # DDESeg: its own extractors, e.g. a loaded filterbank
    else:
        spectrogram = next((m for m in model.modules() if isinstance(m, Spectrogram)), None)
        filterbank = next((m for m in model.modules() if isinstance(m, LogMelFilterBank)), None)
        if spectrogram is not None and filterbank is not None:
            frontend = LogMelFrontend.from_modules(spectrogram, filterbank)
        else:
            frontend = LogMelFrontend(config.model.frontend)
    hop, n_fft = config.model.frontend.hop_length, config.model.frontend.n_fft
    samples = max((frames - 1) * hop, n_fft)  # reflect padding needs more than n_fft / 2 samples
    device = next((p.device for p in frontend.parameters()), torch.device("cpu"))
    with torch.no_grad():
        logmel = frontend(torch.zeros(1, samples, device=device))[0].float().cpu()  # [frames', mel]
    if logmel.shape[1] != mel_bins:
        raise DDESegError(
            f"the model front end makes {logmel.shape[1]} mel bins but the shards' log-mels have {mel_bins}:"
            " the checkpoint's config does not match these shards"
        )
    # Every frame of silence is the same; repeat the last one if the front end made fewer frames.
    index = torch.arange(frames).clamp(max=logmel.shape[0] - 1)
    return logmel[index]


class AudioControl:
    """Pairs each batch with the audio the model is given, under one of `AUDIO_CONTROLS`.

    Iterate `control(batches)` to get `(batch, audio)`; `unchanged_frames` counts frames that
    kept their own audio under `shuffled` (only a rank holding one frame in all).
    """

    def __init__(self, mode: str, model: torch.nn.Module, config: Config) -> None:
        if mode not in AUDIO_CONTROLS:
            raise DDESegError(f"audio control {mode!r} is not one of {', '.join(AUDIO_CONTROLS)}")
        self.mode, self.model, self.config = mode, model, config
        self.unchanged_frames = 0
        self._silent: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, batches: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        if self.mode == "shuffled":
            yield from self._shuffled(batches)
            return
        for batch in batches:
            audio = batch["logmel"]
            yield batch, (self._silent_like(audio) if self.mode == "silent" else audio)

    def _silent_like(self, audio: torch.Tensor) -> torch.Tensor:
        frames, mel_bins = audio.shape[-2], audio.shape[-1]
        if (frames, mel_bins) not in self._silent:
            self._silent[frames, mel_bins] = silent_logmel(self.model, self.config, frames, mel_bins)
        return self._silent[frames, mel_bins].to(audio.dtype).expand(audio.shape).contiguous()

    def _shuffled(self, batches: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        pending: dict[str, Any] | None = None  # a first batch of one frame, waiting for a donor
        previous: torch.Tensor | None = None  # the last batch's own audio
        for batch in batches:
            audio = batch["logmel"]
            if audio.shape[0] >= 2:
                control = audio.roll(-1, dims=0)  # frame i hears frame i + 1
            elif previous is not None:
                control = previous[:1]
            else:
                pending, previous = batch, audio
                continue
            if pending is not None:
                yield pending, audio[:1]
                pending = None
            yield batch, control
            previous = audio
        if pending is not None:
            self.unchanged_frames += pending["logmel"].shape[0]
            yield pending, pending["logmel"]
