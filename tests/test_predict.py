"""`ddeseg predict` on video files written here with PyAV from a `ddeseg synth` video (its frames
and its audio): outputs, frame timing, audio windows, inputs equal to the evaluation loader's,
and every kind of bad input. A micro DDESeg (configs/demo.yaml shrunk by MICRO_OVERRIDES) with a
random memory bank, saved as a training checkpoint, is the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ddeseg.audio import LogMelBatcher, fit_length
from ddeseg.audio_controls import silent_logmel
from ddeseg.classes import AVSS_CLASSES
from ddeseg.cli.app import app
from ddeseg.config import Config, load_config, to_dict
from ddeseg.data import schema
from ddeseg.data.augment import preprocess_for_model
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import make_eval_loader
from ddeseg.errors import DDESegError
from ddeseg.inference import resolve_class_names
from ddeseg.metrics import predicted_labels
from ddeseg.models import build_model
from ddeseg.pipelines.records import AudioSpec
from ddeseg.pipelines.sources.common import read_audio
from ddeseg.segment import classes_present, labels_at_size, model_inputs, predict_video
from ddeseg.training.checkpoint import FORMAT, atomic_torch_save
from ddeseg.video import AUDIO_PADDED, AUDIO_TRACK, SILENCE_AFTER_END, SILENCE_NO_TRACK, sample_frames

SYNTH_RATE = 16_000  # the synthetic wavs' rate
FPS_IN = 5  # frames/s of the test videos: each synthetic frame is shown for its whole second


# --------------------------------------------------------------------------------------------
# Fixtures: a checkpoint, a synthetic video's frames and audio, video files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The micro model is fastest on one thread; on a shared 2-core machine a second OpenMP
    thread that waits for a busy core makes a forward pass 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(prepared_synthetic, micro_config_overrides) -> Config:
    return load_config(prepared_synthetic.config, micro_config_overrides)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    net = build_model(config.model)
    net.set_memory_bank(torch.randn(config.model.num_classes, 4, config.model.audio_embed_dim))
    return net.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, prepared_synthetic, config, model) -> Path:
    names = json.loads((prepared_synthetic.shards / schema.CLASSES_FILE).read_text())["names"]
    payload = {"format": FORMAT, "model": model.state_dict(), "config": to_dict(config), "classes": names, "step": 0}
    return atomic_torch_save(payload, tmp_path_factory.mktemp("run") / "best.pt")


@dataclass
class SynthVideo:
    video: str
    split: str
    frames: list[np.ndarray]  # uint8 [H, W, 3], one per second, decoded as the eval loader does
    wavs: list[Path]  # the per-second wavs of the ddeseg layout
    audio: np.ndarray  # int16 [seconds * 16000], the wavs end to end


@pytest.fixture(scope="module")
def synth(prepared_synthetic) -> SynthVideo:
    """The first val video (86 x 64 px, 10 s) of the prepared synthetic dataset."""
    raw = prepared_synthetic.raw
    meta = json.loads((raw / "synth_meta.json").read_text())
    video = next(v for v in meta["videos"] if v["split"] == "val" and v["width"] != v["height"])
    files = [frame["files"]["AVSS"] for frame in video["frames"]]
    frames = [schema.decode_image((raw / f["image"]).read_bytes()) for f in files]
    wavs = [raw / f["audio"] for f in files]
    audio = np.concatenate([soundfile.read(str(w), dtype="int16")[0] for w in wavs])
    assert audio.shape[0] == len(frames) * SYNTH_RATE
    return SynthVideo(video["video"], video["split"], frames, wavs, audio)


def write_video(
    path: Path,
    frames: list[np.ndarray],
    audio: np.ndarray | None,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    audio_codec: str = "aac",
    audio_rate: int = SYNTH_RATE,
) -> Path:
    """Each frame shown for one second at FPS_IN frames/s; `audio` int16 `[samples, channels]`."""
    container = av.open(str(path), "w")
    video = container.add_stream(codec, rate=FPS_IN)
    video.height, video.width = frames[0].shape[:2]
    video.pix_fmt = pix_fmt
    if audio is not None:  # every stream before the first packet
        layout = "mono" if audio.shape[1] == 1 else "stereo"
        stream = container.add_stream(audio_codec, rate=audio_rate, layout=layout)
    pts = 0
    for image in frames:
        for _ in range(FPS_IN):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts
            pts += 1
            container.mux(video.encode(frame))
    container.mux(video.encode(None))
    if audio is not None:
        for start in range(0, audio.shape[0], 1000):
            chunk = np.ascontiguousarray(audio[start : start + 1000]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
            frame.sample_rate, frame.pts = audio_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    container.close()
    return path


def stereo(audio: np.ndarray) -> np.ndarray:
    return np.stack([audio, audio], axis=1)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory, synth) -> Path:
    """H.264 + AAC, stereo at 44.1 kHz (the track is resampled, mixed and cut by predict)."""
    audio = soxr.resample(synth.audio.astype(np.float32) / 32768, SYNTH_RATE, 44100)
    audio = np.clip(np.rint(audio * 32767), -32768, 32767).astype(np.int16)
    left_right = np.stack([audio, (audio // 2).astype(np.int16)], axis=1)
    return write_video(tmp_path_factory.mktemp("videos") / "street.mp4", synth.frames, left_right, audio_rate=44100)


def faststart(source: Path, target: Path) -> Path:
    """`source` remuxed with its index (moov atom) at the start of the file."""
    with av.open(str(source)) as reader, av.open(str(target), "w", options={"movflags": "faststart"}) as writer:
        streams = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
        for packet in reader.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                writer.mux(packet)
    return target


def run_cli(*args: str):
    return CliRunner().invoke(app, ["predict", *args, "--quiet"], catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_predict_writes_masks_overlays_video_and_json(tmp_path, checkpoint, mp4, synth):
    result = run_cli("--checkpoint", str(checkpoint), str(mp4), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "street"
    seconds = len(synth.frames)
    height, width = synth.frames[0].shape[:2]

    masks = sorted((out / "masks").glob("*.png"))
    assert [m.name for m in masks] == [f"{k:06d}.png" for k in range(seconds)]
    document = json.loads((out / "predictions.json").read_text())
    assert [f["time_s"] for f in document["frames"]] == [float(k) for k in range(seconds)]
    assert document["audio"]["track"] and set(document["audio"]["sources"]) == {AUDIO_TRACK}
    names = document["class_names"]
    assert names == ["background", "alpha-disc", "bravo-square"]
    for mask_path, frame in zip(masks, document["frames"], strict=True):
        with Image.open(mask_path) as image:
            assert image.mode == "L" and image.size == (width, height)
            mask = np.asarray(image)
        assert mask.max() < len(names)
        # The JSON describes the saved mask: classes, pixel fractions, boxes.
        entries, union_box = classes_present(mask, names)
        assert frame["classes"] == entries and frame["union_box"] == union_box
        for entry in entries:
            assert 0 < entry["pixel_fraction"] <= 1 and all(0 <= v <= 1 for v in entry["box"])
        with Image.open(out / frame["overlay"]) as picture:
            assert picture.mode == "RGB" and picture.size[1] == height and picture.size[0] > width

    with av.open(str(out / "overlay.mp4")) as container:
        assert container.streams.video and container.streams.audio
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        # At the source's frame rate: every frame of the video, the frames between two
        # predictions (1 per second) with the last prediction's mask and legend.
        assert len(pictures) == seconds * FPS_IN
        assert container.streams.video[0].average_rate == FPS_IN
    assert document["overlay_video"] == {"frames": "source", "frames_per_second": FPS_IN, "frames_written": seconds * FPS_IN}
    overlays = []
    for frame in document["frames"]:
        with Image.open(out / frame["overlay"]) as picture:
            overlays.append(np.asarray(picture, dtype=np.float32))
    for index, picture in enumerate(pictures):
        second = index // FPS_IN  # the synthetic frame of second k is shown for the whole second
        error = [np.abs(picture[: o.shape[0], : o.shape[1]] - o).mean() for o in overlays]
        assert error[second] <= min(error) + 1.0, (index, error)  # its own second's overlay (the legend says the time)
        assert error[second] < 6.0, (index, error[second])  # the H.264 encoding's loss only
    # The original AAC track, copied packet for packet.
    assert audio_packets(out / "overlay.mp4") == audio_packets(mp4)


def test_predict_section_set_and_options(tmp_path, checkpoint, mp4, synth):
    """predict.frames_per_second from --set; -f beats it; OUT/config.yaml is the resolved config."""
    seconds = len(synth.frames)
    result = run_cli("--checkpoint", str(checkpoint), str(mp4), "--out", str(tmp_path / "half"),
                     "--set", "predict.frames_per_second=0.5", "--set", "predict.batch_size=3")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "half" / "street" / "predictions.json").read_text())
    assert [f["time_s"] for f in document["frames"]] == [2.0 * k for k in range((seconds + 1) // 2)]
    written = load_config(tmp_path / "half" / "config.yaml")
    assert (written.predict.frames_per_second, written.predict.batch_size) == (0.5, 3)
    with av.open(str(tmp_path / "half" / "street" / "overlay.mp4")) as container:  # the source's rate
        assert len(list(container.decode(video=0))) == seconds * FPS_IN

    # Asked otherwise: one picture per prediction, at the sampling rate.
    result = run_cli("--checkpoint", str(checkpoint), str(mp4), "--out", str(tmp_path / "sampled"),
                     "--set", "predict.overlay_video=sampled")
    assert result.exit_code == 0, result.output
    with av.open(str(tmp_path / "sampled" / "street" / "overlay.mp4")) as container:
        assert len(list(container.decode(video=0))) == seconds and container.streams.video[0].average_rate == 1

    result = run_cli("--checkpoint", str(checkpoint), str(mp4), "--out", str(tmp_path / "one"),
                     "--set", "predict.frames_per_second=0.5", "-f", "1")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "one" / "street" / "predictions.json").read_text())
    assert len(document["frames"]) == seconds
    assert load_config(tmp_path / "one" / "config.yaml").predict.frames_per_second == 1.0


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(packet) for packet in container.demux(audio=0) if packet.size]


def test_frames_are_sampled_at_the_requested_rate(model, config, mp4):
    two = list(predict_video(mp4, model, config, ["bg", "a", "b"], frames_per_second=2, batch_size=3))
    assert [p.time_s for p in two] == [k / 2 for k in range(20)]
    for prediction in two:  # the frame on screen at t: shown at or before t, replaced after t
        assert prediction.frame_time_s <= prediction.time_s + 1e-6 < prediction.frame_time_s + 1 / FPS_IN
        assert prediction.mask.shape == (64, 86) and prediction.mask.dtype == np.uint8
    half = list(predict_video(mp4, model, config, ["bg", "a", "b"], frames_per_second=0.5))
    assert [p.time_s for p in half] == [0.0, 2.0, 4.0, 6.0, 8.0]


def inputs_seen_by(model, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, audio) tensors `model` is called with while `run()` runs, concatenated."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append([a.detach().clone() for a in args]))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])


def test_model_inputs_equal_the_evaluation_path(model, config, mp4):
    """The tensors `predict_video` feeds the model == `preprocess_for_model` on the same decoded
    frame and on the log-mel `prepare` computes (`LogMelBatcher`, float16) from the same audio."""
    images, logmels = inputs_seen_by(model, lambda: list(predict_video(mp4, model, config, ["bg", "a", "b"], batch_size=4)))
    frames = list(sample_frames(mp4, config, frames_per_second=1))
    assert torch.equal(model_inputs(frames, LogMelBatcher(model.frontend(), torch.device("cpu")), config)[0], images)
    prepare_logmel = LogMelBatcher(config.model.frontend, torch.device("cpu"))
    for index, frame in enumerate(frames):
        image, logmel = preprocess_for_model(frame.image, prepare_logmel(frame.audio[None])[0], config)
        assert torch.equal(images[index], image)
        assert torch.equal(logmels[index], logmel)
    assert images.shape == (10, 3, config.data.image_size, config.data.image_size)


def test_lossless_video_gives_exactly_the_evaluation_loaders_inputs(tmp_path, model, config, prepared_synthetic, synth):
    """A lossless video (PNG frames, 16-bit PCM) of a prepared synthetic video: predict's frames,
    audio and model inputs equal those of `ddeseg prepare` + the evaluation loader."""
    video = write_video(
        tmp_path / "lossless.mov", synth.frames, stereo(synth.audio), codec="png", pix_fmt="rgb24", audio_codec="pcm_s16le"
    )
    frames = list(sample_frames(video, config, frames_per_second=1))
    assert len(frames) == len(synth.frames)
    rate, seconds = config.model.frontend.sample_rate, config.data.clip_seconds
    for frame, image, wav in zip(frames, synth.frames, synth.wavs, strict=True):
        assert np.array_equal(frame.image, image)
        expected = read_audio(wav.parent, AudioSpec(paths=(wav.name,), window="head"), rate, seconds)
        assert np.array_equal(frame.audio, expected)
    images, logmels = inputs_seen_by(model, lambda: list(predict_video(video, model, config, ["bg", "a", "b"], batch_size=3)))

    index = ShardIndex(prepared_synthetic.shards)
    loader = make_eval_loader(
        index.shards(config.task, synth.split), config, errors_dir=tmp_path / "errors", batch_size=4, num_workers=0
    )
    evaluated = {}
    for batch in loader:
        for i, (name, number) in enumerate(zip(batch["video"], batch["frame"].tolist(), strict=True)):
            if name == synth.video:
                evaluated[number] = (batch["image"][i], batch["logmel"][i])
    assert sorted(evaluated) == list(range(len(frames)))
    for k in range(len(frames)):
        assert torch.equal(images[k], evaluated[k][0])
        assert torch.equal(logmels[k], evaluated[k][1])


# --------------------------------------------------------------------------------------------
# Units: labels, audio windows, class names
# --------------------------------------------------------------------------------------------


def test_labels_at_size_is_predicted_labels_of_the_resized_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 8, 8, generator=generator)
    size = (13, 21)
    expected = predicted_labels(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
    for budget in (13 * 21 * 2, 1 << 25):  # classes two at a time, and all at once
        assert torch.equal(labels_at_size(logits, size, budget=budget).long(), expected)
    binary = torch.randn(2, 1, 8, 8, generator=generator)
    expected = predicted_labels(F.interpolate(binary, size=size, mode="bilinear", align_corners=False))
    assert torch.equal(labels_at_size(binary, size).long(), expected)


def test_a_short_audio_track_is_repeat_padded_then_silent(tmp_path, config, synth):
    cut = int(5.5 * SYNTH_RATE)  # the track ends half-way through second 5 of a 10 s video
    video = write_video(
        tmp_path / "short.mov", synth.frames, synth.audio[:cut, None], codec="png", pix_fmt="rgb24", audio_codec="pcm_s16le"
    )
    frames = list(sample_frames(video, config, frames_per_second=1))
    assert [f.audio_source for f in frames] == [AUDIO_TRACK] * 5 + [AUDIO_PADDED] + [SILENCE_AFTER_END] * 4
    rate = config.model.frontend.sample_rate
    half = soxr.resample(synth.audio[5 * SYNTH_RATE : cut].astype(np.float32) / 32768, SYNTH_RATE, rate, quality="HQ")
    assert np.array_equal(frames[5].audio, fit_length(half.astype(np.float32), rate))
    assert all(not f.audio.any() for f in frames[6:])


def test_class_names_come_from_the_checkpoint_a_file_or_the_task(tmp_path, config):
    assert resolve_class_names(config, ["background", "x", "y", "z"]) == ["background", "x", "y"]
    v2 = load_config(None, ["model.num_classes=71"])
    assert resolve_class_names(v2, []) == list(AVSS_CLASSES)  # an official v2 checkpoint
    binary = load_config(None, ["task=v1s", "model.num_classes=1"])
    assert resolve_class_names(binary, []) == ["background", "foreground"]
    with pytest.raises(DDESegError, match="--classes"):
        resolve_class_names(config, [])
    listed = tmp_path / "names.json"
    listed.write_text(json.dumps(["bg", "drum", "dog"]))
    assert resolve_class_names(config, [], listed) == ["bg", "drum", "dog"]
    listed.write_text(json.dumps(["bg", "drum"]))
    with pytest.raises(DDESegError, match="2 classes but the model predicts 3"):
        resolve_class_names(config, [], listed)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_videos_are_reported_one_line_each_and_the_others_done(tmp_path, checkpoint, mp4, synth):
    good = mp4
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 20)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the moov atom is at the end
    # Index first, then cut: the file opens and decodes for seconds before the data ends.
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(faststart(good, tmp_path / "faststart.mp4").read_bytes()[: good.stat().st_size // 2])
    wav = tmp_path / "song.wav"
    soundfile.write(str(wav), synth.audio, SYNTH_RATE)
    still = tmp_path / "still.png"
    Image.fromarray(synth.frames[0]).save(still)
    empty = tmp_path / "empty.mkv"  # a video stream without a single frame
    container = av.open(str(empty), "w")
    stream = container.add_stream("ffv1", rate=FPS_IN)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    audio = container.add_stream("pcm_s16le", rate=SYNTH_RATE, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts = SYNTH_RATE, 0
    container.mux(audio.encode(frame))
    container.close()
    mute = write_video(tmp_path / "mute.mov", synth.frames[:2], None, codec="png", pix_fmt="rgb24")
    missing = tmp_path / "missing.mp4"
    pcm = write_video(  # a good one whose audio is re-encoded (PCM is not allowed in MP4)
        tmp_path / "pcm.mov", synth.frames[:2], stereo(synth.audio[: 2 * SYNTH_RATE]), codec="png", pix_fmt="rgb24",
        audio_codec="pcm_s16le",
    )

    bad = {
        text: "not a readable video",
        corrupt: "not a readable video",
        truncated: "corrupt audio data after",
        wav: "no video stream",
        still: "still image",
        empty: "zero duration",
        mute: "no audio track",
        missing: "file not found",
    }
    out = tmp_path / "out"
    inputs = [text, good, *list(bad)[1:], pcm]
    result = run_cli("--checkpoint", str(checkpoint), *map(str, inputs), "--out", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad), result.stderr
    for path, reason in bad.items():
        (line,) = [line for line in errors if line.startswith(f"error: {path}: ")]
        assert reason in line, line
    assert "--allow-no-audio" in next(line for line in errors if str(mute) in line)
    # The good video is done; nothing of the bad ones (no folder, no partial folder) is left.
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "pcm", "street"]
    assert len(list((out / "street" / "masks").glob("*.png"))) == len(synth.frames)
    with av.open(str(out / "pcm" / "overlay.mp4")) as container:
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac"
        audio_s = sum(frame.samples for frame in container.decode(stream)) / stream.rate
    assert abs(audio_s - 2) < 0.1


def test_allow_no_audio_predicts_with_silence_and_says_so(tmp_path, checkpoint, model, config, synth):
    odd = [image[:47, :65] for image in synth.frames[:3]]  # odd sizes: the overlay MP4 is padded
    mute = write_video(tmp_path / "mute.mov", odd, None, codec="png", pix_fmt="rgb24")
    out = tmp_path / "out"
    result = run_cli("--checkpoint", str(checkpoint), str(mute), "--out", str(out), "--allow-no-audio")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "mute" / "predictions.json").read_text())
    assert document["audio"]["silence"] and not document["audio"]["track"] and document["audio"]["note"]
    assert [f["audio"] for f in document["frames"]] == [SILENCE_NO_TRACK] * 3
    with Image.open(out / "mute" / "masks" / "000000.png") as mask:
        assert mask.size == (65, 47)
    with av.open(str(out / "mute" / "overlay.mp4")) as container:
        assert not container.streams.audio
        assert len(list(container.decode(video=0))) == 3 * FPS_IN  # the source's frames
    # The model heard the log-mel of a zero waveform, as evaluation's silent control.
    frames = list(sample_frames(mute, config, allow_no_audio=True))
    _, logmels = model_inputs(frames, LogMelBatcher(model.frontend(), torch.device("cpu")), config)
    silence = silent_logmel(model, config, logmels.shape[2], logmels.shape[3])
    assert all(torch.equal(logmel[0], silence) for logmel in logmels)
