"""Frozen configuration built once at the edge (CLI or caller) and passed into constructors."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .filters import FileFilter

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_TAGS = {"ViT-B-32": "laion2b_s34b_b79k"}
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
DEFAULT_INDEX = "default"
# What one note contributes to an index: about 2 MB of prose is ~0.5M tokens, ~7k chunks.
DEFAULT_MAX_NOTE_BYTES = 2 << 20


@dataclass(frozen=True)
class IndexRoot:
    """Where indexes live, and how that was decided (`mmsearch list` says so)."""

    path: Path
    # how: "from --index-dir", "from $MMSEARCH_HOME", "found upward", "per-user default"
    source: str


def find_index_root(
    explicit: str | os.PathLike | None = None, cwd: Path | None = None
) -> IndexRoot:
    """--index-dir, else $MMSEARCH_HOME, else the nearest `indexes/` folder upward from the
    current directory that holds an index (a folder with a manifest.json), else the per-user
    data directory. An `indexes/` folder without an index in it is not taken: a project's own
    `indexes/` folder (SQL, search engines) must not receive the user's photo index."""
    if explicit:
        return IndexRoot(Path(explicit).expanduser(), "from --index-dir")
    env = os.environ.get("MMSEARCH_HOME")
    if env:
        return IndexRoot(Path(env).expanduser(), "from $MMSEARCH_HOME")
    try:
        here = Path(cwd) if cwd is not None else Path.cwd()
    except OSError:  # the current directory was deleted
        here = None
    if here is not None:
        for folder in (here, *here.parents):
            candidate = folder / "indexes"
            if _holds_an_index(candidate):
                return IndexRoot(candidate, "found upward")
    return IndexRoot(_user_data_dir() / "mmsearch" / "indexes", "per-user default")


def index_root(explicit: str | os.PathLike | None = None) -> Path:
    """The index root's path (see find_index_root)."""
    return find_index_root(explicit).path


def _holds_an_index(folder: Path) -> bool:
    try:
        return any((p / "manifest.json").is_file() for p in folder.iterdir())
    except OSError:  # not a folder, or one we may not read
        return False


def _user_data_dir() -> Path:
    """$XDG_DATA_HOME (default ~/.local/share); ~/Library/Application Support on macOS;
    %LOCALAPPDATA% on Windows."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return Path(local) if local else Path.home() / "AppData" / "Local"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg)
    return Path.home() / ".local" / "share"


@dataclass(frozen=True)
class ModelSpec:
    """Which open_clip model: a built-in name with a weights tag, an hf-hub id or a local directory.

    `str(spec)` is the canonical form stored in manifests: `NAME:TAG`, `hf-hub:org/repo` or
    `local-dir:/absolute/path`.
    """

    name: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        text = text.strip()
        if not text:
            raise UsageError("empty model spec")
        if text.startswith(HF_HUB):
            if not text[len(HF_HUB) :]:
                raise UsageError("model spec 'hf-hub:' needs a repository id, e.g. hf-hub:org/repo")
            return cls(text)
        if text.startswith(LOCAL_DIR):
            return cls._local(text[len(LOCAL_DIR) :])
        expanded = Path(text).expanduser()
        name, sep, tag = text.partition(":")
        # NAME:TAG, where TAG may be a weights file (ViT-B-32:/path/to/weights.safetensors)
        tagged = bool(sep) and len(name) > 1 and os.sep not in name and not name.startswith(".")
        looks_like_path = not tagged and (text.startswith((".", "/", "~")) or os.sep in text)
        if expanded.is_dir() or expanded.is_file() or looks_like_path:
            return cls._local(text)
        if sep and not tag:
            raise UsageError(f"model spec {text!r} has an empty weights tag")
        return cls(name, tag or DEFAULT_TAGS.get(name))

    @classmethod
    def _local(cls, path: str) -> ModelSpec:
        p = Path(path).expanduser()
        if p.is_file():
            raise UsageError(
                f"{path} is a file; --model takes the model directory that holds "
                "open_clip_config.json and open_clip_model.safetensors"
            )
        if not p.is_dir():
            raise UsageError(f"model directory not found: {path}")
        if not (p / "open_clip_config.json").is_file():
            raise UsageError(f"{path} is not a model directory (no open_clip_config.json in it)")
        return cls(LOCAL_DIR + str(p.resolve()))

    @property
    def is_local(self) -> bool:
        return self.name.startswith(LOCAL_DIR)

    @property
    def local_path(self) -> Path | None:
        return Path(self.name[len(LOCAL_DIR) :]) if self.is_local else None

    def __str__(self) -> str:
        return f"{self.name}:{self.pretrained}" if self.pretrained else self.name


@dataclass(frozen=True)
class AudioWindowing:
    """How recordings are cut for an audio tower: its sample rate and window length, and the hop
    between window starts (what `loaders.audio.load_audio` and `iter_windows` take). The defaults
    are CLAP's."""

    sample_rate: int = 48_000  # CLAP's rate
    window_s: float = 10.0  # CLAP's input length
    hop_s: float = 7.5  # 2.5 s overlap: an event up to 2.5 s long lies whole inside some window


@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes the model's input; mirrors open_clip's PreprocessCfg (eval mode)."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    draft: bool = True  # let JPEG decoding downscale in the DCT domain, to >= 2x the target size

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


@dataclass(frozen=True)
class EncoderOptions:
    model: ModelSpec | None = None  # None: the index's own model (or the default for a new index)
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32
    audio_model: str | None = None


@dataclass(frozen=True)
class RaySettings:
    """Where and how `mmsearch index --ray` embeds (see mmsearch.pipeline.ray)."""

    address: str = "auto"  # "auto": the running cluster (RAY_ADDRESS); "local"; or ray://host:port
    actors: int | None = None  # encoder actors; None: one per GPU, else (CPUs - 1), at least 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    files_per_batch: int = 64  # files one actor call hashes, decodes and embeds


@dataclass(frozen=True)
class IndexOptions:
    roots: tuple[Path, ...]
    name: str = DEFAULT_INDEX
    root_dir: Path = field(default_factory=index_root)
    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    batch_size: int = 32
    workers: int | None = None  # None: picked from the core count
    hidden: bool = False
    follow_links: bool = False
    rebuild: bool = False
    commit_every: int = 256  # files per committed chunk
    # ... and a commit at least every this many seconds of work (None: by count only), so a
    # kill or Ctrl-C on a slow model loses seconds, not minutes
    commit_seconds: float | None = 10.0
    types: tuple[str, ...] | None = None  # modalities this run indexes (None: all)
    # Vector index (mmsearch.storage.vectors.choose_type): auto | flat | ivf; None keeps the index's own
    # choice (auto for a new index). auto is exact below `exact_below` vectors, IVF above.
    index_type: str | None = None
    exact_below: int = 300_000
    vector_memory: int | None = None  # bytes the vector index may take; None: half the RAM
    ray: RaySettings | None = None  # embed on a Ray cluster instead of this machine
    max_note_bytes: int = DEFAULT_MAX_NOTE_BYTES  # the rest of a longer note: a warning
    query_model: str | None = None  # record this query tower for text queries (query_tower)
    no_query_model: bool = False  # forget the index's query tower: its model's own reads text


@dataclass(frozen=True)
class SearchOptions:
    name: str = DEFAULT_INDEX
    root_dir: Path = field(default_factory=index_root)
    k: int = 10
    modality: str = "any"  # image | text | audio | any
    device: str = "auto"
    min_relevance: float | None = None  # hits below this calibrated relevance are dropped
    filters: FileFilter = field(default_factory=FileFilter)  # which files may be returned
    group: bool = False  # one row per file (its best segment), the others counted
    exclude_self: bool = False  # image/audio queries: not the query file or its exact copies
    snippets: bool = True  # note hits carry their lines
    # the text tower for text queries (encoders.query_tower): a directory or a published name;
    # None: the index's own query tower if it has one, else its model's text tower
    query_model: str | None = None
