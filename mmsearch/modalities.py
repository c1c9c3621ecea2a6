"""One entry per modality: which files it takes, which tower embeds them, how a hit's place in
the file reads, and which function of `mmsearch.embed` embeds them.

A leaf module (it imports nothing of mmsearch), so that loaders, which must start fast in worker
processes, can read it. Adding a modality means one entry here plus its loader (`loaders/`), its
tower (an `Encoder` attribute) and its embed function (`embed.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGE = "image"
TEXT = "text"
AUDIO = "audio"
VIDEO = "video"


@dataclass(frozen=True)
class Modality:
    name: str  # as stored in the catalog and given to --type
    extensions: frozenset[str]  # lower-case, with the dot
    tower: str  # the Encoder attribute holding the tower that embeds it
    # What a hit's start/end are: none (the whole file), line numbers or seconds.
    span: Literal["none", "lines", "seconds"]
    # The function in mmsearch.embed that embeds a list of loaded files of this modality (named,
    # not imported: embed.py imports the encoders, which this leaf module must not).
    embed: str
    # `mmsearch duplicates`: the cosine two files' vectors need to be copies of each other (None:
    # this modality is not compared), and whether their perceptual hashes, recorded at index
    # time (mmsearch.loaders.phash), must agree too. Calibrated in benchmarks/bench_duplicates.py.
    duplicate_cosine: float | None = None
    duplicate_hash: bool = False
    # Another tower used when the encoder has one (a video's soundtrack: "audio"); its units
    # are stored with that tower's modality (hits of the soundtrack are "audio" hits).
    also: str | None = None

    def uses(self, tower: str) -> bool:
        return tower in (self.tower, self.also)


# What Pillow reads; .heic/.heif through pillow-heif, .avif through Pillow's own plugin.
_IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# libsndfile's formats, and what PyAV reads when libsndfile cannot (.m4a, .aac).
_AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aiff", ".aif",
     ".aifc", ".au", ".caf", ".w64"}
)  # fmt: skip
# What PyAV demuxes as video (a file of them with sound only is indexed by its sound).
_VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp"})

TABLE: tuple[Modality, ...] = (
    Modality(
        IMAGE,
        _IMAGE_EXTENSIONS,
        tower="image",
        span="none",
        embed="embed_images",
        duplicate_cosine=0.4,
        duplicate_hash=True,
    ),  # fmt: skip
    Modality(TEXT, frozenset({".txt", ".md"}), tower="text", span="lines", embed="embed_notes"),
    Modality(
        AUDIO,
        _AUDIO_EXTENSIONS,
        tower="audio",
        span="seconds",
        embed="embed_recordings",
        duplicate_cosine=0.95,
    ),  # fmt: skip
    # Frames kept by scene change through the image tower, the soundtrack through the audio one.
    Modality(
        VIDEO, _VIDEO_EXTENSIONS, tower="image", span="seconds", embed="embed_videos", also=AUDIO
    ),
)

MODALITIES: tuple[str, ...] = tuple(m.name for m in TABLE)
BY_NAME: dict[str, Modality] = {m.name: m for m in TABLE}
BY_EXTENSION: dict[str, str] = {ext: m.name for m in TABLE for ext in m.extensions}


def span_of(name: str) -> str:
    """What a hit's start/end mean for modality `name`; line numbers for one this version does
    not know (an index written by a newer one)."""
    m = BY_NAME.get(name)
    return m.span if m is not None else "lines"
