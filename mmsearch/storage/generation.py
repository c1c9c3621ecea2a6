"""Rebuilding an index beside the live data: a new generation is written in a directory of its
own (gen-*), resumed if a run was killed, and made live by one atomic replace of the manifest;
the old generation's files are then removed (damaged ones kept aside). Until then the live
generation answers every reader as before. A mixin of Collection (storage/collection.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import time

from ..encoders.base import EncoderIdentity
from ..errors import IndexFormatError
from .catalog import Catalog
from .layout import CATALOG, DATA_FILES, META_AUDIO, META_ENCODER, META_STATE


class GenerationsMixin:
    def begin_generation(
        self, identity: EncoderIdentity, audio: EncoderIdentity | None = None
    ) -> None:
        """Start (or resume) a rebuild beside the live generation. The catalog being written is
        the new one; the live one stays open as `salvage` when its vectors are from the same
        model (so intact vectors are copied, not embedded again)."""
        pending = self.manifest.pending
        resumed = None
        if pending and (self.dir / pending / CATALOG).is_file():
            try:
                cat = Catalog(self.dir / pending / CATALOG)
                cat.check()
                same = _key(cat.get_identity(META_ENCODER)) == identity.key
                if audio is not None:  # align-audio: the same new projector too
                    same = same and _key(cat.get_identity(META_AUDIO)) == audio.key
                if same:
                    resumed = cat
                else:
                    cat.close()
            except (IndexFormatError, sqlite3.DatabaseError):
                pass
        if resumed is None:
            self.discard_pending()
            pending = f"gen-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
            (self.dir / pending).mkdir()
            self.write_manifest(pending=pending)
            resumed = Catalog(self.dir / pending / CATALOG)
            resumed.set_identity(META_ENCODER, identity)
            if audio:
                resumed.set_identity(META_AUDIO, audio)
            resumed.set_meta(META_STATE, "building")
        else:
            self.notes.append("resumed an unfinished rebuild")
        self.live = self.catalog
        if self.catalog is not None and _key(self.manifest.encoder) == identity.key:
            self.salvage = self.catalog
        self.catalog = resumed
        self.building = self.dir / pending
        self.new_identity = {"encoder": identity, "audio": resumed.get_identity(META_AUDIO)}
        self.unload_vectors()

    def discard_pending(self) -> None:
        """Drop an unfinished rebuild's directory (a plain run works on the live generation)."""
        pending = self.manifest.pending
        if not pending:
            return
        shutil.rmtree(self.dir / pending, ignore_errors=True)
        self.write_manifest(pending=None)
        self.notes.append("discarded an unfinished rebuild")

    def finish_generation(self, options=None, progress=None) -> None:
        """Make the generation being built the live one: its vectors saved, then the manifest
        switched in one atomic replace, then the old generation's files removed (damaged ones
        are kept aside, under the names the run reports)."""
        new = self.building
        self.vectors  # noqa: B018 - loaded (from the new catalog) if this run had not yet
        self.save_vectors(options, progress)
        self.catalog.set_meta(META_STATE, "live")
        choice = self.manifest.vector_index.choice
        choice = getattr(options, "index_type", None) or choice
        old_dir = self.data_dir
        identity = self.catalog.get_identity(META_ENCODER)
        audio = self.catalog.get_identity(META_AUDIO)
        self.building = None
        self.manifest.audio_encoder = None
        self.write_manifest(
            data=new.name, pending=None, encoder=identity, name=self.name,
            **({"audio_encoder": audio} if audio else {}), **self._vector_fields(choice),
        )  # fmt: skip
        for cat in (self.live, self.salvage):
            if cat is not None:
                cat.close()
        self.live = self.salvage = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in DATA_FILES:
            path = old_dir / name
            if path in self.damaged and path.exists():
                aside = path.with_name(f"{name}.damaged-{stamp}")
                os.replace(path, aside)
                self.notes.append(f"{path} was damaged; kept it aside as {aside}")
            else:
                path.unlink(missing_ok=True)
        if old_dir != self.dir and not any(old_dir.iterdir()):
            old_dir.rmdir()


def _key(identity: EncoderIdentity | None) -> str | None:
    return identity.key if identity is not None else None
