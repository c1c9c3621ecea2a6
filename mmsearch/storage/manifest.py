"""manifest.json: what an index directory holds, typed.

Written only by `Collection` (one atomic replace per change). Readers get a `Manifest`; the
encoders' identities are `EncoderIdentity`s (recorded the same way in the catalog too, see
`encoders.Encoder.identity`). Keys this version does not know (written by a newer one) are kept
in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..encoders.base import EncoderIdentity
from ..errors import IndexFormatError
from .atomic import replace_text

FORMAT_VERSION = 1
IDENTITIES = ("encoder", "audio_encoder")  # the Manifest fields that are EncoderIdentity
FLAT = "IDMap2,FlatIP"  # the exact index (storage.vectors.FLAT; not imported: no faiss here)


@dataclass
class VectorInfo:
    """The vector file's kind as chosen (`--index-type`) and, for IVF, its tuning."""

    choice: str = "auto"  # auto | flat | ivf, remembered from the last --index-type
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None
    recall_at_10_shifted: float | None = None
    recall_target: float | None = None
    trained_on: int | None = None

    @classmethod
    def from_json(cls, d) -> VectorInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Manifest:
    name: str | None = None
    encoder: EncoderIdentity | None = None  # the model the vectors are made with
    audio_encoder: EncoderIdentity | None = None  # the audio tower and projector
    model_spec: str | None = None  # the --model asked for, recorded before it loads
    data: str = "."  # the live generation's directory, relative to the index directory
    pending: str | None = None  # a rebuild's generation directory while it is being built
    vectors_generation: int | None = None  # the catalog generation vectors.faiss reflects
    index_type: str = FLAT
    vectors: int | None = None
    files: int | None = None
    vector_index: VectorInfo = field(default_factory=VectorInfo)
    # what the relevance calibration (storage.calibration.FILE) was fitted on: counts, probes
    relevance: dict | None = None
    # the second text tower text queries use (encoders.query_tower.check_alignment's record)
    query_tower: dict | None = None
    created: str | None = None
    updated: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "vector_index"}
        m = cls(**{k: v for k, v in d.items() if k in known})
        m.vector_index = VectorInfo.from_json(d.get("vector_index"))
        for key in IDENTITIES:
            setattr(m, key, EncoderIdentity.from_dict(d[key]) if d.get(key) else None)
        m.extra = {
            k: v for k, v in d.items() if k not in known | {"vector_index", "format_version"}
        }
        return m

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out.pop("extra")
        if self.data == ".":
            out.pop("data")
        out["vector_index"] = self.vector_index.to_json()
        for key in IDENTITIES:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_dict()
        return {**self.extra, **out, "format_version": FORMAT_VERSION}

    def update(self, **changes) -> None:
        for key, value in changes.items():
            if key == "vector_index" and isinstance(value, dict):
                value = VectorInfo.from_json(value)
            if not hasattr(self, key):
                raise AttributeError(f"manifest has no field {key!r}")
            setattr(self, key, value)

    @staticmethod
    def read(path: Path) -> dict | None:
        """The manifest's JSON object, or None when there is none or it is damaged (then the
        catalog is asked). Unreadable for permissions is an error, not damage."""
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except PermissionError as e:
            raise IndexFormatError(f"cannot read {path}: {e.strerror}") from None
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def write(self, path: Path) -> None:
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.created = self.created or self.updated
        replace_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True))
