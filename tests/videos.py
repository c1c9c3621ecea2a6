"""Small videos for tests, written with PyAV: scenes of known pictures at known seconds, with or
without a soundtrack."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

# Output extension -> (muxer, video codec, audio codec) that this PyAV build can write.
FORMATS = {
    ".mp4": ("mp4", "mpeg4", "aac"),
    ".m4v": ("mp4", "mpeg4", "aac"),
    ".mov": ("mov", "mpeg4", "aac"),
    ".3gp": ("3gp", "h264", "aac"),
    ".mkv": ("matroska", "h264", "libopus"),
    ".webm": ("webm", "libvpx-vp9", "libopus"),
    ".avi": ("avi", "mpeg4", "mp3"),
    # sound only (video=False)
    ".m4a": ("ipod", None, "aac"),
    ".aac": ("adts", None, "aac"),
}


def picture(scene, size: tuple[int, int]) -> np.ndarray:
    """A scene's picture (H, W, 3): an (r, g, b) colour, or an int seeding a random pattern of
    8x8 blocks (distinct scenes the image tower tells apart)."""
    w, h = size
    if isinstance(scene, int):
        rng = np.random.default_rng(scene)
        blocks = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        return np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])
    return np.full((h, w, 3), scene, np.uint8)


def make_video(
    path: Path,
    scenes: list[tuple[object, float]],
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    tone: float | None = 440.0,
    gop: int | None = None,
    noise: float = 0.0,
    rotation: int | None = None,
    video: bool = True,
) -> Path:
    """Write `scenes` [(scene, seconds)] (see `picture`) one after the other at `fps`, with a
    `tone` Hz sine soundtrack at 16 kHz (None: no sound). `gop` is the keyframe interval in
    frames, `noise` the amplitude of per-frame random noise, `rotation` the display rotation;
    `video=False` writes the sound alone (an .m4a or .aac recording, an audio-only .mp4)."""
    import av

    fmt, vcodec, acodec = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as out:
        total = sum(s for _, s in scenes)
        if video:
            v = out.add_stream(vcodec, rate=fps)
            v.width, v.height = size
            v.pix_fmt = "yuv420p"
            if gop:
                v.codec_context.gop_size = gop
            if rotation is not None:
                v.set_display_rotation(rotation)
        a = out.add_stream(acodec, rate=48000 if "opus" in acodec else 16000) if tone else None
        if a is not None:
            a.layout = "mono"
        n = 0
        for scene, seconds in scenes if video else []:
            base = picture(scene, size).astype(np.int16)
            for _ in range(int(round(seconds * fps))):
                img = base
                if noise:
                    img = base + rng.integers(-noise, noise + 1, base.shape)
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), "rgb24")
                frame.pts, frame.time_base = n, Fraction(1, fps)
                n += 1
                out.mux(v.encode(frame))
        if video:
            out.mux(v.encode(None))
        if a is not None:
            _write_tone(out, a, tone, total)
    return path


def _write_tone(out, stream, freq: float, seconds: float) -> None:
    import av

    rate = stream.codec_context.sample_rate
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    for s in range(0, len(wave), 4096):
        frame = av.AudioFrame.from_ndarray(wave[None, s : s + 4096], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, s, Fraction(1, rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
