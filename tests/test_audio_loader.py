"""Audio decoding: windows, resampling, downmixing, streaming and every kind of bad file."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from mmsearch.config import AudioWindowing
from mmsearch.errors import LoadError
from mmsearch.loaders import audio as audio_loader
from mmsearch.loaders.audio import AUDIO_EXTENSIONS, iter_windows, load_audio


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], 1)


def write(path, data, rate, **kw):
    sf.write(str(path), data, rate, **kw)
    return path


def test_short_file_is_one_window_of_its_true_length(tmp_path):
    p = write(tmp_path / "short.wav", tone(0.5, 48000), 48000)
    a = load_audio(p)
    assert a.sample_rate == 48000 and a.duration == pytest.approx(0.5)
    assert len(a.windows) == 1
    start, end, w = a.windows[0]
    assert (start, end) == (0.0, pytest.approx(0.5))
    assert w.dtype == np.float32 and w.ndim == 1 and len(w) == 24000  # not padded: the tower pads
    assert a.notes == () and not a.truncated


def test_long_file_full_windows_with_overlap_and_end_aligned_tail(tmp_path):
    p = write(tmp_path / "long.flac", tone(33.3, 16000), 16000)
    a = load_audio(p, AudioWindowing(16000, 10, 7.5))
    spans = [(s, e) for s, e, _ in a.windows]
    assert spans[:4] == [(0.0, 10.0), (7.5, 17.5), (15.0, 25.0), (22.5, 32.5)]
    assert spans[-1][0] == pytest.approx(23.3) and spans[-1][1] == pytest.approx(33.3)
    assert all(len(w) == 160000 for _, _, w in a.windows)
    assert a.duration == pytest.approx(33.3)
    # Each window holds the samples at its position in the file.
    full = sf.read(str(p), dtype="float32")[0]
    s, _, w = a.windows[1]
    np.testing.assert_array_equal(w, full[int(s * 16000) : int(s * 16000) + 160000])
    s, _, w = a.windows[-1]
    np.testing.assert_array_equal(w, full[-160000:])


def test_exact_multiple_and_tiny_tail_add_no_duplicate_window(tmp_path):
    cut = AudioWindowing(8000, 10, 7.5)
    exact = load_audio(write(tmp_path / "a.wav", tone(17.5, 8000), 8000), cut)
    assert [(s, e) for s, e, _ in exact.windows] == [(0.0, 10.0), (7.5, 17.5)]
    one = load_audio(write(tmp_path / "b.wav", tone(10.0, 8000), 8000), cut)
    assert [(s, e) for s, e, _ in one.windows] == [(0.0, 10.0)]
    # 50 ms past the last full window is within the slack: no near-duplicate window for it.
    slack = load_audio(write(tmp_path / "c.wav", tone(10.05, 8000), 8000), cut)
    assert len(slack.windows) == 1


def test_resample_192k_keeps_pitch_and_length(tmp_path):
    p = write(tmp_path / "hi.wav", tone(2.0, 192000, freq=1000), 192000, subtype="PCM_24")
    a = load_audio(p, AudioWindowing(sample_rate=48000))
    w = a.windows[0][2]
    assert len(w) == 96000 and a.duration == pytest.approx(2.0)
    spectrum = np.abs(np.fft.rfft(w))
    assert np.argmax(spectrum) * 48000 / len(w) == pytest.approx(1000, abs=1)
    assert "resampled 192000 Hz to 48000 Hz" in a.notes


def test_upsample_8k_like_spoken_digits(tmp_path):
    p = write(tmp_path / "digit.wav", tone(0.4, 8000, freq=300), 8000, subtype="PCM_16")
    w = load_audio(p, AudioWindowing(sample_rate=48000)).windows[0][2]
    assert len(w) == 19200
    assert np.abs(w).max() == pytest.approx(0.5, abs=0.02)


def test_eight_channels_downmix_to_the_channel_mean(tmp_path):
    data = tone(1.0, 8000, channels=8)
    p = write(tmp_path / "surround.wav", data, 8000, subtype="FLOAT")
    a = load_audio(p, AudioWindowing(sample_rate=8000))
    np.testing.assert_allclose(a.windows[0][2], data.mean(axis=1), atol=1e-6)
    assert "downmixed 8 channels to mono" in a.notes


def test_same_file_same_samples_every_time(tmp_path):
    rng = np.random.default_rng(0)
    p = write(
        tmp_path / "noise.ogg",
        (0.2 * rng.standard_normal((44100 * 12, 2))).astype(np.float32),
        44100,
    )
    a, b = load_audio(p), load_audio(p)
    assert [(s, e) for s, e, _ in a.windows] == [(s, e) for s, e, _ in b.windows]
    for (_, _, x), (_, _, y) in zip(a.windows, b.windows, strict=True):
        assert x.tobytes() == y.tobytes()


def test_block_size_does_not_change_the_windows_beyond_resampler_rounding(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    p = write(tmp_path / "n.wav", (0.2 * rng.standard_normal(22050 * 25)).astype(np.float32), 22050)
    big = load_audio(p, AudioWindowing(sample_rate=48000))
    monkeypatch.setattr(audio_loader, "BLOCK_FRAMES", 1000)
    small = load_audio(p, AudioWindowing(sample_rate=48000))
    assert [(s, e) for s, e, _ in big.windows] == [(s, e) for s, e, _ in small.windows]
    for (_, _, x), (_, _, y) in zip(big.windows, small.windows, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.parametrize(
    "name,fmt,subtype,rate",
    [
        ("a.wav", "WAV", "PCM_16", 44100),
        ("a.flac", "FLAC", None, 44100),
        ("a.ogg", "OGG", "VORBIS", 44100),
        ("a.opus", "OGG", "OPUS", 48000),
        ("a.mp3", "MP3", None, 44100),
        ("a.aiff", "AIFF", None, 22050),
    ],
)
def test_formats_decode(tmp_path, name, fmt, subtype, rate):
    assert "." + name.split(".")[1] in AUDIO_EXTENSIONS
    p = write(tmp_path / name, tone(1.5, rate), rate, format=fmt, subtype=subtype)
    a = load_audio(p, AudioWindowing(sample_rate=48000))
    assert a.duration == pytest.approx(1.5, abs=0.1)  # mp3/opus add encoder padding
    assert np.abs(a.windows[0][2]).max() > 0.3


def test_bytes_path_like_the_indexer_passes(tmp_path):
    p = write(tmp_path / "caf\u00e9.wav", tone(0.3, 8000), 8000)
    assert len(load_audio(bytes(p)).windows) == 1


def test_max_seconds_cuts_and_says_so(tmp_path):
    p = write(tmp_path / "long.wav", tone(60, 8000), 8000)
    a = load_audio(p, AudioWindowing(8000, 10, 10), max_seconds=25)
    assert a.truncated and a.duration == pytest.approx(25)
    assert [(s, e) for s, e, _ in a.windows] == [(0, 10), (10, 20), (15, 25)]
    assert any("first 25 s of 60 s" in n for n in a.notes)


def test_hour_long_file_streams_in_bounded_memory(tmp_path):
    rate = 8000
    p = tmp_path / "hour.wav"
    with sf.SoundFile(str(p), "w", rate, 1, subtype="PCM_16") as f:
        block = tone(60, rate, freq=200)
        for _ in range(60):
            f.write(block)
    tracemalloc.start()
    try:
        count, last_end = 0, 0.0
        for _start, end, w in iter_windows(p, AudioWindowing(rate, 10, 10)):
            count, last_end = count + 1, end
            assert len(w) == 10 * rate
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 360 and last_end == pytest.approx(3600)
    decoded_whole = 3600 * rate * 4
    assert peak < decoded_whole / 20  # a few windows and blocks, never the whole file


# --- bad audio: each gets a LoadError with a reason ------------------------------------------


def reason_for(path, **kw) -> str:
    with pytest.raises(LoadError) as e:
        load_audio(path, **kw)
    assert e.value.reason == str(e.value) and e.value.reason
    return e.value.reason


def test_empty_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    assert reason_for(p) == "empty file (0 bytes)"


def test_zero_length_wav(tmp_path):
    p = write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    assert "zero-length" in reason_for(p)


def test_one_sample(tmp_path):
    p = write(tmp_path / "one.wav", np.array([0.5], np.float32), 16000)
    assert "too short" in reason_for(p) and "1 sample " in reason_for(p)


def test_corrupt_bytes(tmp_path):
    p = tmp_path / "corrupt.wav"
    p.write_bytes(np.random.default_rng(0).bytes(5000))
    assert "not a readable audio file" in reason_for(p)


def test_text_file_named_mp3(tmp_path):
    p = tmp_path / "notes.mp3"
    p.write_text("this is not audio\n" * 100)
    assert "not a readable audio file" in reason_for(p)


def test_truncated_flac_yields_the_whole_blocks_then_fails_the_file(tmp_path):
    """A 20 s FLAC cut at half its bytes (about 10 s of audio) decodes block by block
    (BLOCK_FRAMES = 65536 frames, 4.096 s at 16 kHz): the first two blocks (8.192 s) decode, the
    third reaches the cut and libsndfile reports lost sync. iter_windows yields the 2 s windows of
    the decoded audio, then raises; load_audio fails the whole file with the same reason."""
    good = write(tmp_path / "good.flac", tone(20, 16000), 16000)
    data = good.read_bytes()
    p = tmp_path / "cut.flac"
    p.write_bytes(data[: len(data) // 2])
    reason = r"^audio data is damaged \(.*lost sync.*\); 8\.2 s decoded before the damage$"

    got = []
    with pytest.raises(LoadError, match=reason):
        for window in iter_windows(p, AudioWindowing(16000, 2, 2)):
            got.append(window)
    assert [(s, e) for s, e, _ in got] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0)]
    full = sf.read(str(good), dtype="float32")[0]
    np.testing.assert_array_equal(np.concatenate([w for _, _, w in got]), full[: 8 * 16000])

    with pytest.raises(LoadError, match=reason):
        load_audio(p, AudioWindowing(sample_rate=16000))


def test_nan_samples(tmp_path):
    x = tone(1.0, 8000)
    x[4000] = np.nan
    p = write(tmp_path / "nan.wav", x, 8000, subtype="FLOAT")
    r = reason_for(p)
    assert "NaN or infinite" in r and "0.500 s" in r


def test_inf_samples(tmp_path):
    x = tone(1.0, 8000)
    x[10] = np.inf
    p = write(tmp_path / "inf.wav", x, 8000, subtype="DOUBLE")
    assert "NaN or infinite" in reason_for(p)


def test_missing_file(tmp_path):
    assert "cannot read file" in reason_for(tmp_path / "gone.wav")


def test_bad_window_settings_are_a_programming_error(tmp_path):
    p = write(tmp_path / "x.wav", tone(1, 8000), 8000)
    with pytest.raises(ValueError):
        load_audio(p, AudioWindowing(window_s=5, hop_s=6))


@pytest.mark.parametrize("ext", ["mp3", "wav", "flac", "ogg"])
@pytest.mark.parametrize("size", [100, 5000, 200_000])
def test_random_bytes_named_as_audio_say_so(tmp_path, ext, size):
    p = tmp_path / f"noise.{ext}"
    p.write_bytes(np.random.default_rng(size).bytes(size))
    reason = reason_for(p)
    assert reason == "not a readable audio file: format not recognised"  # not "does not exist"
    with pytest.raises(LoadError) as e:
        next(iter_windows(os.fsencode(p)))
    assert e.value.reason == reason
