"""The encoder an index run embeds with: the index's own model (or the one asked for), and the
audio tower with its projector, checked against what the index was built with."""

from __future__ import annotations

import numpy as np

from ..config import DEFAULT_MODEL, IndexOptions, ModelSpec
from ..encoders import (
    Encoder,
    EncoderIdentity,
    attach_audio,
    create_encoder,
    export_query_tower,
    query_text_tower,
)
from ..errors import ModelMismatchError, UsageError
from ..storage.atomic import write_error
from ..storage.collection import Collection
from ..storage.layout import model_cache_dir


def encoder_for(col: Collection, options: IndexOptions) -> Encoder:
    requested = options.encoder.model
    if requested is None:
        known = col.encoder_identity
        spec = known.spec if known else col.manifest.model_spec or DEFAULT_MODEL
        requested = ModelSpec.parse(spec)
    if not col.encoder_identity:
        # Remembered before seconds of loading: a run killed now still knows its --model.
        col.write_manifest(name=col.name, model_spec=str(requested))
    encoder = create_encoder(requested, options.encoder)
    if options.rebuild:
        col.begin_generation(encoder.identity)
    else:
        col.check_encoder(encoder.identity)
    if not col.encoder_identity:
        col.set_encoder(encoder.identity)
    cache = model_cache_dir(col.root_dir, encoder.identity.key)
    try:
        export_query_tower(encoder, cache)
    except OSError as e:
        raise write_error(cache, e) from None
    return encoder


def attach_index_audio(
    col: Collection,
    encoder: Encoder,
    options: IndexOptions,
    progress,
    realign: bool = False,
    record: bool = True,
) -> None:
    """Load the audio tower for this index: --audio-model if given, else the audio model and
    projector of a fine-tuned --model directory if it has them, else the index's own. With
    `realign`, the projector is fitted afresh (and recorded by the caller, `record=False`)."""
    from ..encoders.clap import (
        AUDIO_MODEL_DIRNAME,
        PROJECTOR_FILENAME,
        model_dir_audio_model,
        model_dir_of,
        save_projector,
    )

    known = col.audio_identity
    # a rebuild keeps the live generation's audio model unless told otherwise
    previous = known or col.manifest.audio_encoder
    model_dir = model_dir_of(encoder) if options.encoder.model is not None else None
    from_model_dir = model_dir is not None and (
        (model_dir / AUDIO_MODEL_DIRNAME).is_dir() or (model_dir / PROJECTOR_FILENAME).is_file()
    )
    requested = options.encoder.audio_model
    if requested is None and from_model_dir:
        requested = model_dir_audio_model(encoder)
    if requested is None and previous:
        requested = previous.spec
    stored = col.projector_path
    use_stored = (
        known
        and not from_model_dir
        and requested == known.spec
        and stored.is_file()
        and not realign
    )
    attach_audio(
        encoder,
        requested,
        model_cache_dir(col.root_dir, encoder.identity.key),
        projector=stored if use_stored else None,
        refit=realign,
        progress=lambda stage, done, total: progress(f"audio:{stage}", done, total),
    )
    identity = encoder.audio.identity
    if realign:
        known = None
    elif known and known.key != identity.key:
        source = f" (from model directory {model_dir})" if from_model_dir else ""
        raise ModelMismatchError(
            f"index {col.name!r} holds audio embedded with another audio model than the one "
            f"requested{source}: {_difference(known, identity)}. Use the index's audio model, "
            f"re-align it with `mmsearch align-audio --index {col.name}`, or rebuild with --rebuild"
        )
    if not known and record:
        col.set_audio(identity, lambda path: save_projector(encoder.audio.projector, path))


def _difference(have: EncoderIdentity, want: EncoderIdentity) -> str:
    """The fields in which two identities differ, as 'field: index has X, requested Y'."""
    have, want = have.to_dict(), want.to_dict()
    keys = [k for k in sorted(set(have) | set(want)) if k != "key" and have.get(k) != want.get(k)]
    if not keys:
        keys = ["key"]
    return "; ".join(f"{k}: index has {have.get(k)}, requested {want.get(k)}" for k in keys)


def text_embedder(col: Collection, encoder: Encoder, options: IndexOptions):
    """Embeds the relevance calibration's probe queries with the index's model: the run's own
    text tower, else the exported query tower, else the model loaded for it."""

    def embed(texts: list[str]) -> np.ndarray:
        if encoder.text is not None:
            return encoder.encode_text(texts)
        tower = query_text_tower(model_cache_dir(col.root_dir, col.encoder_identity.key))
        if tower is not None:
            return tower.embed(texts)
        spec = ModelSpec.parse(col.encoder_identity.spec)
        return create_encoder(spec, options.encoder).encode_text(texts)

    return embed


def query_tower_record(options: IndexOptions, identity: EncoderIdentity) -> dict | None:
    """The manifest record of the run's query tower (--query-model) for an index of `identity`;
    refused (ModelMismatchError) when it is aligned to another model."""
    source = options.query_model
    if source is None:
        return None
    if options.no_query_model:
        raise UsageError("--query-model and --no-query-model exclude each other")
    from ..encoders import query_tower

    return query_tower.check_alignment(query_tower.resolve(source), identity)


def keep_query_tower(
    col: Collection, record: dict | None, notes: list[str], drop: bool = False
) -> None:
    """Record the run's query tower, with its torch-free copy exported beside the model's (when
    its architecture allows); forget the index's one when asked to (`drop`), or when a rebuild
    with another model left it aligned to the old model. Each is one atomic manifest write: a
    crash leaves the old record. A torch-free copy stays in the model's cache, which other
    indexes of the root share."""
    from ..encoders import query_tower

    old = col.manifest.query_tower
    if drop:
        if old is not None:
            col.write_manifest(query_tower=None)
        what = f"removed the query tower {old['source']}" if old else "there was no query tower"
        notes.append(f"{what}; text queries use the model's own text tower")
        return
    if record is not None:
        cache = model_cache_dir(col.root_dir, col.encoder_identity.key)
        try:
            query_tower.export(record["source"], cache)
        except OSError as e:
            raise write_error(cache, e) from None
        col.write_manifest(query_tower=record)
        return
    if old is not None and not query_tower.fits(old["aligned_to"], col.encoder_identity):
        col.write_manifest(query_tower=None)
        notes.append(
            f"dropped the query tower {old['source']}: it is aligned to the model the index was "
            "built with before; distill one for the new model (mmsearch distill-text)"
        )
