"""Video files for `ddeseg predict`: probing, streaming decoding of frames and audio windows, and
the overlay MP4 writer (PyAV).

Decoding (PyAV, streaming: memory does not grow with the length of the video)
------------------------------------------------------------------------------
- Timeline: time 0 is the presentation time of the video's first frame.
- Frames: the video stream is decoded in order, one frame at a time. Sampled frame k is the frame
  on screen at `t_k = k / F` (F = `frames_per_second`): the last decoded frame whose timestamp is
  <= t_k. Frames are sampled while t_k is before the end of the last frame (its timestamp plus
  its duration), so a 10 s video at F = 1 gives the frames shown at 0, 1, ..., 9 s.
- Audio, which second: frame k hears `[t_k, t_k + clip_seconds)` of the audio track, i.e. the
  frame is at the *start* of its second. This is the AVSBench convention (frame k is annotated
  with second k of the audio) and the window `ddeseg prepare` reads for a frame
  (`AudioSpec(window="second", start_s=k)`). The audio is read through a second, independent
  demuxer of the same file and decoded incrementally into a rolling buffer (one window plus one
  decoded audio frame), so neither the file's interleaving nor its length changes the memory.
  Each window is mixed to mono, resampled to `model.frontend.sample_rate` (soxr HQ) and
  repeat-padded when the track ends inside it: the functions `ddeseg prepare` uses
  (`mix_to_mono`, `resample`, `fit_length` of `ddeseg.pipelines.sources.common`). A window wholly
  after the end of the track, or a video without audio (only with `allow_no_audio`), is silence:
  a zero waveform, i.e. the log-mel of a zero waveform (-100 dB everywhere). Every frame records
  where its audio came from (`audio` in `predictions.json`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ddeseg.audio import fit_length, mix_to_mono, resample
from ddeseg.config import Config
from ddeseg.errors import DDESegError

TIME_TOLERANCE_S = 5e-4  # timestamps closer than this are the same instant (rounded time bases)
IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif"}
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AUDIO_TRACK, AUDIO_PADDED = "track", "track (repeat-padded: the track ends within this window)"
SILENCE_NO_TRACK = "silence (the video has no audio track)"
SILENCE_AFTER_END = "silence (after the end of the audio track)"
SILENCE_BEFORE_START = "silence (before the audio track starts)"


class VideoError(DDESegError):
    """A video file that cannot be used (the message starts with its path)."""


# --------------------------------------------------------------------------------------------
# Probing and decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns from a file's header."""

    path: Path
    width: int
    height: int
    duration_s: float | None  # None when the container does not say
    frame_rate: float | None  # average frames/s of the video stream, when known
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None

    def expected_frames(self, frames_per_second: float) -> int | None:
        """Sampled frames for a video of this duration (None when the duration is unknown)."""
        if not self.duration_s:
            return None
        return max(1, math.ceil(self.duration_s * frames_per_second - TIME_TOLERANCE_S))


def ffmpeg_reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: not a readable video ({ffmpeg_reason(error)})") from None
    except OSError as error:
        raise VideoError(f"{path}: cannot be read ({error.strerror or error})") from None


def probe_video(path: str | Path, allow_no_audio: bool = False) -> VideoInfo:
    """Open `path` and check that it is a video we can predict on.

    Raises `VideoError` ("PATH: reason") for a missing file, a file FFmpeg cannot read (not a
    video, corrupt), a still image, no video stream, a zero duration, or no audio stream (unless
    `allow_no_audio`).
    """
    path = Path(path)
    with _open(path) as container:
        if container.format.name in IMAGE_FORMATS:
            raise VideoError(f"{path}: a still image ({container.format.name}), not a video")
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
        video = container.streams.video[0]
        width, height = video.codec_context.width, video.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{path}: the video stream has no frame size ({width}x{height})")
        duration_s = None
        if video.duration is not None and video.time_base is not None:
            duration_s = float(video.duration * video.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        if duration_s is not None and duration_s <= 0:
            raise VideoError(f"{path}: zero duration")
        rate = video.average_rate or video.guessed_rate
        audio = container.streams.audio[0] if container.streams.audio else None
        if audio is None and not allow_no_audio:
            raise VideoError(
                f"{path}: no audio track; DDESeg segments what is heard (pass --allow-no-audio to predict with silence)"
            )
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            duration_s=duration_s,
            frame_rate=float(rate) if rate else None,
            has_audio=audio is not None,
            audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            audio_channels=audio.codec_context.channels if audio is not None else None,
        )


def _frame_time(frame: av.VideoFrame | av.AudioFrame, fallback: float) -> float:
    return float(frame.time) if frame.time is not None else fallback


def _video_frames(path: Path, container: av.container.InputContainer) -> Iterator[tuple[float, av.VideoFrame]]:
    """(presentation time in s, frame) of every frame of the first video stream, in order."""
    stream = container.streams.video[0]
    # No `stream.thread_type = "AUTO"`: with frame threading, closing the container mid-stream
    # (an early stop, an error) sometimes hangs when torchvision is loaded in the process.
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    index, time_s = 0, 0.0
    try:
        for frame in container.decode(stream):
            time_s = _frame_time(frame, index / rate)
            yield time_s, frame
            index += 1
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: corrupt video data after {time_s:.2f} s ({ffmpeg_reason(error)})") from None


def _frame_duration(frame: av.VideoFrame, stream: av.VideoStream) -> float:
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 0.0


def sampled_video_frames(path: str | Path, frames_per_second: float) -> Iterator[tuple[int, float, float, av.VideoFrame]]:
    """`(k, t_k, frame time, frame)` for the frame on screen at every `t_k = k / F` (see the module
    docstring); times are on the video's timeline (0 = first frame). Holds one decoded frame."""
    if not frames_per_second > 0:
        raise DDESegError(f"frames per second must be > 0, got {frames_per_second}")
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        origin: float | None = None
        previous: tuple[float, av.VideoFrame] | None = None
        k = 0
        for time_s, frame in _video_frames(path, container):
            if origin is None:
                origin = time_s
            time_s -= origin
            if previous is not None:
                while k / frames_per_second < time_s - TIME_TOLERANCE_S:  # `previous` is on screen at t_k
                    yield k, k / frames_per_second, previous[0], previous[1]
                    k += 1
            previous = (time_s, frame)
        if previous is None:
            raise VideoError(f"{path}: no video frames (zero duration)")
        end_s = previous[0] + _frame_duration(previous[1], stream)
        while k == 0 or k / frames_per_second < end_s - TIME_TOLERANCE_S:
            yield k, k / frames_per_second, previous[0], previous[1]
            k += 1


class AudioWindows:
    """Windows of a file's first audio track on the video's timeline, decoded incrementally.

    `window(t)` returns the mono waveform the model hears for a frame at `t` seconds (see the
    module docstring), float32 `[round(clip_seconds * sample_rate)]`, and where it came from.
    Calls must come with non-decreasing `t`: samples before the last window are dropped.
    """

    def __init__(self, path: str | Path, origin_s: float, sample_rate: int, clip_seconds: float):
        self.path = Path(path)
        self.sample_rate, self.clip_seconds = sample_rate, clip_seconds
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.origin_s = origin_s
        self._container = _open(self.path)
        if not self._container.streams.audio:
            self._container.close()
            raise VideoError(f"{self.path}: no audio stream")
        stream = self._container.streams.audio[0]
        self.rate = stream.codec_context.sample_rate
        if not self.rate or self.rate <= 0:
            self._container.close()
            raise VideoError(f"{self.path}: the audio stream has no sample rate")
        self._frames = self._decoded(stream)
        self._chunks: deque[np.ndarray] = deque()  # float32 [samples, channels], contiguous in time
        self._start = 0  # track sample index of the first buffered sample
        self._end = 0  # track sample index after the last buffered sample
        self._offset: int | None = None  # track sample 0 on the video timeline, in samples
        self._exhausted = False

    def _decoded(self, stream: av.AudioStream) -> Iterator[tuple[float, np.ndarray]]:
        # Packed float32 at the track's own rate and layout: only the sample format changes
        # (int16 -> x / 32768 as soundfile reads a wav), so the prepare code does the resampling.
        converter = av.AudioResampler(format="flt")
        time_s = 0.0
        try:
            for frame in self._container.decode(stream):
                time_s = _frame_time(frame, time_s)
                for converted in converter.resample(frame):
                    yield time_s, _packed_samples(converted)
            for converted in converter.resample(None):
                yield time_s, _packed_samples(converted)
        except av.error.FFmpegError as error:
            raise VideoError(f"{self.path}: corrupt audio data after {time_s:.2f} s ({ffmpeg_reason(error)})") from None

    def _pull(self) -> bool:
        item = next(self._frames, None)
        if item is None:
            self._exhausted = True
            return False
        time_s, samples = item
        if self._offset is None:
            self._offset = int(round((time_s - self.origin_s) * self.rate))
        if samples.shape[0]:
            self._chunks.append(samples)
            self._end += samples.shape[0]
        return True

    def window(self, time_s: float) -> tuple[np.ndarray, str]:

        if self._offset is None and not self._pull():
            return np.zeros(self.clip_samples, dtype=np.float32), SILENCE_AFTER_END
        length = int(round(self.clip_seconds * self.rate))
        first = int(round(time_s * self.rate)) - (self._offset or 0)
        last = first + length
        while self._end < last and self._pull():
            self._drop_before(max(first, 0))  # also while pulling: F < 1 skips audio between windows
        self._drop_before(max(first, 0))
        available = self._take(max(first, 0), min(last, self._end))
        if available.shape[0] == 0:
            source = SILENCE_BEFORE_START if last <= 0 else SILENCE_AFTER_END
            return np.zeros(self.clip_samples, dtype=np.float32), source
        if first < 0:  # the track starts after t: silence before it
            lead = np.zeros((-first, available.shape[1]), dtype=np.float32)
            available = np.concatenate([lead, available])
        wave = resample(mix_to_mono(available), self.rate, self.sample_rate)
        source = AUDIO_TRACK if available.shape[0] >= length else AUDIO_PADDED
        return fit_length(wave, self.clip_samples), source

    def _drop_before(self, sample: int) -> None:
        while self._chunks and self._start + self._chunks[0].shape[0] <= sample:
            self._start += self._chunks.popleft().shape[0]

    def _take(self, begin: int, end: int) -> np.ndarray:
        channels = self._chunks[0].shape[1] if self._chunks else 1
        if end <= begin or not self._chunks:
            return np.zeros((0, channels), dtype=np.float32)
        joined = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        # Keep one chunk from `begin` on (windows never go back): a window plus one decoded frame.
        joined = joined[begin - self._start :]
        self._chunks, self._start = deque([joined]), begin
        return joined[: end - begin]

    def close(self) -> None:
        self._frames.close()
        self._container.close()

    def __enter__(self) -> AudioWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _packed_samples(frame: av.AudioFrame) -> np.ndarray:
    """A packed float32 frame -> float32 `[samples, channels]`."""
    channels = frame.layout.nb_channels
    return frame.to_ndarray().reshape(-1, channels).astype(np.float32, copy=False)


@dataclass
class SampledFrame:
    """One sampled frame and the audio the model hears with it."""

    index: int  # k
    time_s: float  # t_k = k / F on the video's timeline
    frame_time_s: float  # timestamp of the decoded frame shown at t_k
    image: np.ndarray  # uint8 RGB [H, W, 3], the video's frame size
    audio: np.ndarray  # float32 [clip samples], mono, at model.frontend.sample_rate
    audio_source: str  # AUDIO_TRACK, AUDIO_PADDED, SILENCE_NO_TRACK or SILENCE_AFTER_END


def sample_frames(
    path: str | Path, config: Config, frames_per_second: float = 1.0, allow_no_audio: bool = False
) -> Iterator[SampledFrame]:
    """Stream a video file into `SampledFrame`s (see the module docstring for the timing).

    Raises `VideoError` for an unusable file (also when it turns out corrupt mid-way).
    """
    path = Path(path)
    info = probe_video(path, allow_no_audio)
    frontend = config.model.frontend
    clip_samples = int(round(config.data.clip_seconds * frontend.sample_rate))
    audio: AudioWindows | None = None
    try:
        for k, time_s, frame_time_s, frame in sampled_video_frames(path, frames_per_second):
            if audio is None and info.has_audio:
                # Opened once the video's first timestamp is known: it is the timeline's origin.
                origin = first_video_time(path)
                audio = AudioWindows(path, origin, frontend.sample_rate, config.data.clip_seconds)
            if audio is not None:
                wave, source = audio.window(time_s)
            else:
                wave, source = np.zeros(clip_samples, dtype=np.float32), SILENCE_NO_TRACK
            image = frame.to_ndarray(format="rgb24")
            yield SampledFrame(k, time_s, frame_time_s, image, wave, source)
    finally:
        if audio is not None:
            audio.close()


class SourceFrames:
    """Every frame of a file's first video stream, in order, on the video's timeline (0 = its
    first frame), decoded one at a time as asked: `until(t)` yields the RGB frames shown before
    time t (those not yielded yet), `until(None)` the rest. For `overlay.mp4` at the source's
    frame rate; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._container = _open(self.path)
        self._frames = _video_frames(self.path, self._container)
        self._origin: float | None = None
        self._next: tuple[float, av.VideoFrame] | None = None
        self._done = False

    def _peek(self) -> tuple[float, av.VideoFrame] | None:
        if self._next is None and not self._done:
            try:
                time_s, frame = next(self._frames)
            except StopIteration:
                self._done = True
                return None
            if self._origin is None:
                self._origin = time_s
            self._next = (time_s - self._origin, frame)
        return self._next

    def until(self, time_s: float | None) -> Iterator[np.ndarray]:
        """uint8 RGB `[H, W, 3]` of each frame whose time is before `time_s` (all when None)."""
        while (item := self._peek()) is not None and (time_s is None or item[0] < time_s - TIME_TOLERANCE_S):
            self._next = None
            yield item[1].to_ndarray(format="rgb24")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> SourceFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_video_time(path: Path) -> float:
    with _open(path) as container:
        for time_s, _ in _video_frames(path, container):
            return time_s
    return 0.0



# --------------------------------------------------------------------------------------------
# The overlay video
# --------------------------------------------------------------------------------------------


def video_codec() -> str:
    """libx264 when this PyAV build has it, else FFmpeg's own MPEG-4 Part 2 encoder."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class OverlayVideoWriter:
    """Writes `overlay.mp4`: pictures at `frames_per_second`, with the source's audio track.

    An AAC track is copied packet for packet (the original audio, no re-encoding); any other
    codec is decoded and encoded to AAC. The audio is read from `audio_source` by its own
    streaming reader as the video advances, so the file is interleaved and memory stays flat.
    `write` every picture (one size), then `close`.
    """

    def __init__(self, path: str | Path, frames_per_second: float, audio_source: Path | None, origin_s: float = 0.0):
        self.path = Path(path)
        self.rate = Fraction(frames_per_second).limit_denominator(1001)
        self.container = av.open(str(self.path), mode="w")
        self.video: av.VideoStream | None = None
        self.frames_written = 0
        self.audio_in: av.container.InputContainer | None = None
        self.audio_copied = False
        self._audio_packets: Iterator[tuple[float, av.Packet]] | None = None
        if audio_source is not None:
            # Every stream must exist before the first packet is written: the audio one now.
            self.audio_in = _open(audio_source)
            stream = self.audio_in.streams.audio[0]
            self.audio_copied = stream.codec_context.name == "aac"
            if self.audio_copied:
                self._audio_packets = self._copied(stream, origin_s)
            else:
                self._audio_packets = self._encoded(stream, origin_s)

    def _copied(self, stream: av.AudioStream, origin_s: float) -> Iterator[tuple[float, av.Packet]]:
        output = self.container.add_stream_from_template(stream)
        shift = int(round(origin_s / stream.time_base)) if stream.time_base else 0
        for packet in self.audio_in.demux(stream):
            if packet.dts is None:  # the demuxer's empty packet at the end
                continue
            packet.dts -= shift
            if packet.pts is not None:
                packet.pts -= shift
            packet.stream = output
            yield float((packet.pts if packet.pts is not None else packet.dts) * stream.time_base), packet

    def _encoded(self, stream: av.AudioStream, origin_s: float) -> Iterator[tuple[float, av.Packet]]:
        rate = stream.codec_context.sample_rate
        out_rate = rate if rate in AAC_RATES else 48000
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        output = self.container.add_stream("aac", rate=out_rate, layout=layout)
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        next_pts: int | None = None  # in samples at out_rate, on the video's timeline

        def encode(frame: av.AudioFrame | None) -> Iterator[tuple[float, av.Packet]]:
            nonlocal next_pts
            for converted in resampler.resample(frame):
                converted.pts, converted.time_base = next_pts, Fraction(1, out_rate)
                next_pts += converted.samples
                for packet in output.encode(converted):
                    yield next_pts / out_rate, packet
            if frame is None:
                for packet in output.encode(None):
                    yield next_pts / out_rate, packet

        yield from ()  # a generator even when nothing is decoded
        for frame in self.audio_in.decode(stream):
            if next_pts is None:
                next_pts = int(round((_frame_time(frame, 0.0) - origin_s) * out_rate))
            yield from encode(frame)
        if next_pts is not None:
            yield from encode(None)

    def write(self, picture: np.ndarray) -> None:
        """Append a uint8 RGB picture `[h, w, 3]` (padded to even sizes for the encoder)."""
        height, width = picture.shape[:2]
        even = np.pad(picture, ((0, height % 2), (0, width % 2), (0, 0)))
        if self.video is not None and (even.shape[1], even.shape[0]) != (self.video.width, self.video.height):
            # The stream changed its frame size mid-way: the encoder keeps the first size.
            even = np.asarray(Image.fromarray(even).resize((self.video.width, self.video.height), Image.BILINEAR))
        if self.video is None:
            codec = video_codec()
            self.video = self.container.add_stream(codec, rate=self.rate)
            self.video.width, self.video.height = even.shape[1], even.shape[0]
            self.video.pix_fmt = "yuv420p"
            if codec == "libx264":
                self.video.options = {"crf": "20", "preset": "veryfast"}
            else:
                self.video.bit_rate = 4_000_000
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(even), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = 1 / self.rate
        self.container.mux(self.video.encode(frame))
        self.frames_written += 1
        self._pump_audio(float(self.frames_written / self.rate))

    def _pump_audio(self, until_s: float | None) -> None:
        """Write source audio up to `until_s` seconds of the output (None: to the end)."""
        if self._audio_packets is None:
            return
        try:
            for time_s, packet in self._audio_packets:
                self.container.mux(packet)
                if until_s is not None and time_s >= until_s:
                    return
        except av.error.FFmpegError:
            pass  # a corrupt track: the prediction reports it; keep what was written
        self._audio_packets = None

    def close(self, finish: bool = True) -> None:
        """Flush the encoders and write the rest of the audio (`finish`), then close the files.
        `finish=False` (after an error) only closes them."""
        try:
            if finish:
                if self.video is not None:
                    self.container.mux(self.video.encode(None))
                self._pump_audio(None)
        finally:
            self.container.close()
            if self.audio_in is not None:
                self.audio_in.close()

