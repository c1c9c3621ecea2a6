"""What a phone's folder holds besides JPEGs and WAVs: m4a/aac voice memos (through PyAV), HEIC
photos (through pillow-heif) and AVIF, upright like any other photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from videos import make_video

from mmsearch.config import AudioWindowing, ImagePrep
from mmsearch.errors import LoadError
from mmsearch.loaders.audio import load_audio
from mmsearch.loaders.image import load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("ext", [".m4a", ".aac"])
def test_memo_is_windowed_like_any_recording(tmp_path, ext):
    p = make_video(tmp_path / f"memo{ext}", [(0, 25)], tone=1000.0, video=False)
    a = load_audio(p, AudioWindowing(16000, 10, 7.5))
    spans = [(s, e) for s, e, _ in a.windows]
    assert spans[:3] == [(0, 10), (7.5, 17.5), (15, 25)]
    assert a.duration == pytest.approx(25, abs=0.1)  # AAC adds at most a frame of padding
    assert a.notes == ()  # 16 kHz mono already
    _, _, w = a.windows[1]
    spectrum = np.abs(np.fft.rfft(w))
    assert np.argmax(spectrum) * 16000 / len(w) == pytest.approx(1000, abs=1)


def test_wav_libsndfile_cannot_read_is_read_by_pyav(tmp_path):
    # A WAV holding Yamaha ADPCM: libsndfile calls its header malformed; FFmpeg decodes it.
    import av

    odd = tmp_path / "odd.wav"
    with av.open(str(odd), "w", format="wav") as out:
        s = out.add_stream("adpcm_yamaha", rate=16000)
        s.layout = "mono"
        wave = (0.3 * np.sin(2 * np.pi * 500 * np.arange(48000) / 16000)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        out.mux(s.encode(frame))
        out.mux(s.encode(None))
    a = load_audio(odd, AudioWindowing(16000, 10, 7.5))
    assert len(a.windows) == 1 and a.duration == pytest.approx(3, abs=0.1)
    _, _, w = a.windows[0]
    assert np.abs(w[8000:16000]).max() == pytest.approx(0.3, abs=0.05)


def test_bad_memo_fails_with_reason(tmp_path):
    (tmp_path / "junk.m4a").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(LoadError, match="not a readable M4A file"):
        load_audio(tmp_path / "junk.m4a")
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(LoadError, match="not a readable audio file: format not recognised"):
        load_audio(tmp_path / "junk.wav")  # libsndfile's reason, not FFmpeg's
    video_only = make_video(tmp_path / "silent.mp4", [(RED, 1)], tone=None)
    video_only = video_only.rename(tmp_path / "silent.m4a")  # the same container
    with pytest.raises(LoadError, match="no audio stream"):
        load_audio(video_only)


def _two_colours() -> Image.Image:
    a = np.zeros((40, 60, 3), np.uint8)
    a[:20], a[20:] = RED, BLUE
    return Image.fromarray(a)


@pytest.mark.parametrize("ext", [".heic", ".avif"])
def test_photo_formats_are_decoded_upright(tmp_path, ext):
    if ext == ".heic":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    plain, turned = tmp_path / f"plain{ext}", tmp_path / f"turned{ext}"
    _two_colours().save(plain, quality=95)
    _two_colours().save(turned, quality=95, exif=exif.tobytes())
    prep = ImagePrep(size=(20, 20), resize_mode="squash")
    a = load_image(plain, prep).astype(int)
    b = load_image(turned, prep).astype(int)
    assert np.abs(a[:8].reshape(-1, 3).mean(0) - RED).max() < 20  # red on top
    # turned clockwise: the top (red) is on the right
    assert np.abs(b[:, 12:].reshape(-1, 3).mean(0) - RED).max() < 20
    assert np.abs(b[:, :8].reshape(-1, 3).mean(0) - BLUE).max() < 20
