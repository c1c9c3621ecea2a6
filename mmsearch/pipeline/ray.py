"""Embedding on a Ray cluster: the same indexing run, with decoding and encoding spread over
Ray Data actors (one encoder per actor, one actor per GPU where the cluster has GPUs).

The driver (the machine running `mmsearch index --ray ...`) walks the roots, plans against the
catalog and commits exactly as a local run does (`pipeline.commit.commit_chunk`, chunk by chunk, crash
safe); only "hash, decode and embed these files" moves to the cluster. Workers must see the files
at the same paths as the driver (a shared or replicated filesystem), and load the model from the
same spec: a hub tag or a path they can read. A worker whose model differs from the index's (other
weights at the same path) is refused rather than mixing vector spaces.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from ..config import RaySettings
from ..embed import Embedded, embed_loaded
from ..errors import ModelMismatchError, UsageError
from ..loaders import Loaded, LoadSettings, file_hash, load_file
from ..records import FileEntry, FileMeta, Segment


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(
            "--ray needs Ray Data: pip install 'mmsearch[ray]' (or pip install 'ray[data,client]')"
        ) from e
    return ray


def connect(settings: RaySettings):
    """Join the cluster at `settings.address` (or start a local one) unless already connected.

    Leaves the process's logging as the caller set it (Ray's `configure_logging=False`); how
    quiet Ray is belongs to the application: see `quiet()`."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=settings.address,  # Ray's own: "auto", "local" or ray://
                include_dashboard=False,
                log_to_driver=False,  # workers log to Ray's log folder, not this process
                configure_logging=False,
            )
        except (ConnectionError, ValueError) as e:  # ValueError: a ray:// without ray[client]
            raise UsageError(
                f"cannot reach a Ray cluster at {settings.address!r} ({e}); start one with "
                "`ray start --head`, or use --ray local to run one on this machine"
            ) from e
    return ray


def quiet() -> None:
    """For a command line: Ray's own chatter (startup notices, Ray Data's progress lines, the core
    worker's C++ log) would drown the command's output; errors still show. Changes process-wide
    settings, so the CLI calls it, never the library."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = _ray().data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class EmbedActor:
    """Holds one encoder (and audio tower) for the whole run; embeds batches of files."""

    def __init__(self, spec: str, precision: str, audio: dict | None, settings: LoadSettings,
                 batch_size: int):  # fmt: skip
        from ..config import EncoderOptions, ModelSpec
        from ..encoders import create_encoder

        self.encoder = create_encoder(
            ModelSpec.parse(spec), EncoderOptions(device="auto", precision=precision)
        )
        if audio is not None:
            from ..encoders import attach_audio

            attach_audio(self.encoder, audio["spec"], audio["cache_dir"], audio["projector"])
        self.settings = settings
        self.batch_size = batch_size
        self.key = self.encoder.identity.key
        self.audio_key = self.encoder.audio.identity.key if self.encoder.audio else ""

    def __call__(self, batch: dict) -> dict:
        entries = [
            FileEntry(bytes(p), str(m), int(s), int(t))
            for p, m, s, t in zip(
                batch["path"], batch["modality"], batch["size"], batch["mtime_ns"], strict=True
            )
        ]
        known = [set(str(k).split(",")) - {""} for k in batch["known"]]
        loaded = []
        for e, reusable in zip(entries, known, strict=True):
            if reusable:  # a touched or moved file: hash it first, decode only if it changed
                try:
                    digest = file_hash(e.path)
                except OSError:  # load_file below records why
                    digest = None
                if digest in reusable:
                    loaded.append(Loaded(e, digest, _REUSED))
                    continue
            loaded.append(load_file(e, self.settings))
        ok = [x for x in loaded if x.error is None and x.payload is not _REUSED]
        embedded = embed_loaded(self.encoder, ok, self.batch_size, _no_tick)
        results = dict(zip((id(x) for x in ok), embedded, strict=True))
        out = {
            k: []
            for k in ("hash", "error", "reason", "segments", "vectors", "dim", "warning", "meta")
        }
        for x in loaded:
            result = results.get(id(x))
            segments, vectors, reason, warning = "", b"", "", ""
            if x.payload is _REUSED:
                reason = _REUSED
            elif isinstance(result, str):
                reason = result
            elif result is not None:
                segments = json.dumps([[s.start, s.end, s.modality] for s in result.segments])
                vectors = np.ascontiguousarray(result.vectors, np.float32).tobytes()
                warning = result.warning or ""
            out["hash"].append(x.hash or "")
            out["error"].append(x.error or "")
            out["reason"].append(reason)
            out["segments"].append(segments)
            out["vectors"].append(vectors)
            out["dim"].append(self.encoder.dim)
            out["warning"].append(warning)
            out["meta"].append(json.dumps(x.meta.values()) if x.meta is not None else "")
        n = len(loaded)
        return {
            "path": list(batch["path"]), "modality": list(batch["modality"]),
            "size": list(batch["size"]), "mtime_ns": list(batch["mtime_ns"]),
            **out, "key": [self.key] * n, "audio_key": [self.audio_key] * n,
        }  # fmt: skip


def _no_tick(n: int) -> None:
    pass


# Marks a file whose content hash matched vectors the index already holds: not decoded or embedded
# on the cluster; the driver reuses the stored vectors.
_REUSED = "<reused>"


def known_hashes(todo, vanished: dict) -> list[str]:
    """Per file to embed, the content hashes whose vectors the index already holds for it: its
    own previous row's (a touched file) and those of vanished files of the same size and
    modality (a move). A worker that finds one of them skips decoding and embedding the file."""
    by_size: dict[tuple[int, str], list[str]] = {}
    for row in vanished.values():
        by_size.setdefault((row.size, row.modality), []).append(row.hash)
    out = []
    for entry, old in todo:
        hashes = list(by_size.get((entry.size, entry.modality), ()))
        if old is not None and old.modality == entry.modality:
            hashes.append(old.hash)
        out.append(",".join(h for h in hashes if h))
    return out


def ray_chunks(todo, vanished, encoder, settings: LoadSettings, options,
               ray_settings: RaySettings, cache_dir):  # fmt: skip
    """(loaded files, path -> embedding result) per committed chunk, computed on the cluster.

    Results are what `embed.embed_loaded` returns per file: Embedded or a reason string;
    files whose content the index already holds (see `known_hashes`) have none.
    """
    ray = connect(ray_settings)
    resources = ray.cluster_resources()
    gpus = ray_settings.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    actors = ray_settings.actors
    if actors is None:
        if gpus > 0:
            actors = max(1, int(resources.get("GPU", 0) // gpus))
        else:
            actors = max(1, int(resources.get("CPU", 1) - 1))
    audio = None
    if encoder.audio is not None:
        audio = {
            "spec": encoder.audio.identity.spec,
            "projector": encoder.audio.projector,
            "cache_dir": str(cache_dir),
        }
    rows = [
        {"path": e.path, "modality": e.modality, "size": e.size, "mtime_ns": e.mtime_ns,
         "known": known}
        for (e, _), known in zip(todo, known_hashes(todo, vanished), strict=True)
    ]  # fmt: skip
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // 16))
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_args=(
            encoder.identity.spec,
            options.encoder.precision,
            audio,
            settings,
            options.batch_size,
        ),  # fmt: skip
        batch_size=ray_settings.files_per_batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=ray_settings.cpus_per_actor,
        batch_format="numpy",
    )
    want = encoder.identity.key
    want_audio = encoder.audio.identity.key if encoder.audio is not None else ""
    for batch in ds.iter_batches(batch_size=max(1, options.commit_every), batch_format="numpy"):
        keys = set(batch["key"].tolist())
        if keys != {want} or (want_audio and set(batch["audio_key"].tolist()) != {want_audio}):
            raise ModelMismatchError(
                f"a Ray worker loaded {encoder.identity.spec} with different weights "
                f"(model key {sorted(keys)} vs the index's {want}); make the same model "
                "files available to every worker"
            )
        loaded, results = [], {}
        for i in range(len(batch["path"])):
            entry = FileEntry(
                bytes(batch["path"][i]), str(batch["modality"][i]), int(batch["size"][i]),
                int(batch["mtime_ns"][i]),
            )  # fmt: skip
            error = str(batch["error"][i]) or None
            meta = str(batch["meta"][i])
            meta = FileMeta(*json.loads(meta)) if meta else None
            loaded.append(Loaded(entry, str(batch["hash"][i]) or None, None, error, meta=meta))
            if error is None and str(batch["reason"][i]) != _REUSED:
                results[entry.path] = _result(batch, i)
        yield loaded, results


def _result(batch, i: int):
    reason = str(batch["reason"][i])
    if reason:
        return reason
    segments = [Segment(s, e, modality=m) for s, e, m in json.loads(str(batch["segments"][i]))]
    vectors = np.frombuffer(bytes(batch["vectors"][i]), np.float32)
    vectors = vectors.reshape(len(segments), int(batch["dim"][i])).copy()
    return Embedded(segments, vectors, str(batch["warning"][i]) or None)


def check_available() -> None:
    """Raise the install hint early (before any work) when Ray is missing."""
    _ray()
