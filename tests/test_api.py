"""The Python API (`ddeseg.load`, `Segmenter.segment`): the README's example runs as written, and
every accepted input form gives the labels of the evaluation preprocessing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import ddeseg
from ddeseg.audio import LogMelBatcher, fit_length, mix_to_mono, resample
from ddeseg.config import load_config
from ddeseg.data import schema
from ddeseg.data.augment import preprocess_for_model
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.pipelines.train import TrainRequest, train
from ddeseg.segment import labels_at_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The micro model on one thread (conftest)."""


@pytest.fixture(scope="module")
def best_checkpoint(tmp_path_factory, prepared_synthetic, micro_config_overrides) -> Path:
    """best.pt of a 4-step micro run (as tests/test_evaluate_trained.py trains one)."""
    root = tmp_path_factory.mktemp("api-run")
    bank = root / "bank.npy"
    np.save(bank, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    overrides = [*micro_config_overrides, "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4"]
    config = load_config(prepared_synthetic.config, overrides)
    train(config, TrainRequest(shards_dir=prepared_synthetic.shards, memory_bank=bank, out_dir=root / "run"), DistributedContext())
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def frames_and_wavs(prepared_synthetic) -> list[tuple[Path, Path]]:
    """(image, wav) files of the first 3 frames of a synthetic video (16 kHz mono wavs)."""
    raw = prepared_synthetic.raw
    video = json.loads((raw / "synth_meta.json").read_text())["videos"][0]
    files = [frame["files"]["AVSS"] for frame in video["frames"][:3]]
    return [(raw / f["image"], raw / f["audio"]) for f in files]


def readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(best_checkpoint, frames_and_wavs, tmp_path, monkeypatch, capsys):
    image, wav = frames_and_wavs[0]
    (tmp_path / "demo-out" / "run").mkdir(parents=True)
    shutil.copy(best_checkpoint, tmp_path / "demo-out" / "run" / "best.pt")
    shutil.copy(image, tmp_path / "frame.png")
    mono, rate = soundfile.read(str(wav), dtype="float32")
    soundfile.write(str(tmp_path / "clip.wav"), np.stack([mono, mono * 0.5], axis=1), rate)  # stereo
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    height, width = np.asarray(Image.open(image)).shape[:2]
    assert printed.endswith(f"({height}, {width})"), printed
    assert printed.startswith("["), printed  # the list of class names


def reference_labels(model: ddeseg.Segmenter, image: np.ndarray, wave: np.ndarray, rate: int) -> np.ndarray:
    """Labels computed step by step from the evaluation's own functions."""
    frontend = model.config.model.frontend
    clip = fit_length(resample(wave, rate, frontend.sample_rate), int(round(model.config.data.clip_seconds * frontend.sample_rate)))
    logmel = LogMelBatcher(model.model.frontend(), torch.device("cpu"))(clip[None])[0]
    pixels, mel = preprocess_for_model(image, logmel, model.config)
    with torch.inference_mode():
        logits = model.model(pixels[None], mel[None])
    return labels_at_size(logits, image.shape[:2])[0].numpy()


def test_every_input_form_gives_the_labels_of_the_evaluation_preprocessing(best_checkpoint, frames_and_wavs):
    model = ddeseg.load(best_checkpoint, device="cpu")
    assert model.class_names[0] == "background"
    images = [schema.decode_image(image.read_bytes()) for image, _ in frames_and_wavs]
    waves = [soundfile.read(str(wav), dtype="float32") for _, wav in frames_and_wavs]
    rate = waves[0][1]
    mono = [wave for wave, _ in waves]
    expected = [reference_labels(model, image, wave, rate) for image, wave in zip(images, mono, strict=True)]

    batch = model.segment(images, mono, rate)
    assert len(batch) == 3 and all(np.array_equal(a, b) for a, b in zip(batch.masks, expected, strict=True))
    # One frame in each form: a path, PIL, a CHW uint8 tensor, a float HWC array in [0, 1].
    stereo = np.stack([mono[0], mono[0]], axis=1)  # equal channels: their mean is the mono wave
    forms = [
        (str(frames_and_wavs[0][0]), mono[0]),
        (Image.fromarray(images[0]), mono[0]),
        (torch.from_numpy(images[0].copy()).permute(2, 0, 1), torch.from_numpy(stereo.T.copy())),  # torchaudio [channels, samples]
        (images[0].astype(np.float32) / 255, stereo),  # soundfile [samples, channels]
        (images[0], np.rint(mono[0] * 32768).clip(-32768, 32767).astype(np.int16)),
    ]
    for frame, wave in forms:
        assert np.array_equal(model.segment(frame, wave, rate).masks[0], expected[0])
    # A batch as arrays: [N, H, W, 3] and [N, samples].
    stacked = model.segment(np.stack(images), np.stack(mono), rate)
    assert all(np.array_equal(a, b) for a, b in zip(stacked.masks, expected, strict=True))
    assert stacked.names(0) == [model.class_names[i] for i in np.unique(expected[0]) if i != 0]


def test_bad_inputs_are_one_line_errors(best_checkpoint, frames_and_wavs):
    model = ddeseg.load(best_checkpoint, device="cpu")
    image = np.zeros((8, 8, 3), np.uint8)
    wave = np.zeros(1000, np.float32)
    with pytest.raises(DDESegError, match="2 waveforms for 3 frames"):
        model.segment([image] * 3, [wave] * 2, 16000)
    with pytest.raises(DDESegError, match="an image must be"):
        model.segment(np.zeros((8, 8, 5), np.uint8), wave, 16000)
    with pytest.raises(DDESegError, match=r"values in \[0, 1\]"):
        model.segment(image.astype(np.float32) + 2, wave, 16000)


def test_mix_to_mono_takes_soundfiles_mono_and_multichannel_arrays():
    mono = np.array([0.5, -0.25, 1.0], np.float32)
    assert np.array_equal(mix_to_mono(mono), mono)  # 1-D: soundfile's mono file (was an IndexError)
    assert np.array_equal(mix_to_mono(mono[:, None]), mono)
    stereo = np.array([[1.0, 0.0], [0.5, 0.5], [-1.0, 1.0]], np.float32)
    assert np.allclose(mix_to_mono(stereo), [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="samples, channels"):
        mix_to_mono(np.zeros((2, 2, 2), np.float32))
