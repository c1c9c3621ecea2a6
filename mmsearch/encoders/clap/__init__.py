"""Audio into the CLIP space: CLAP's audio tower (transformers' ClapModel) plus a projector.

- model.py      Clap: load (hub id or directory, quietly, no pickles), save, embed captions
- tower.py      LogMel features, ClapAudioTower (windows -> CLIP space), load_audio_tower
- projector.py  Projector (CLAP space -> CLIP space): save/load, fit on captions, cache, pick

Importing this package imports no torch or transformers; loading a model does.
"""

from .model import DEFAULT_AUDIO_MODEL, Clap, load_clap, save_clap
from .projector import (
    PROJECTOR_FILENAME,
    FitSettings,
    Projector,
    captions_digest,
    fit_projector,
    fit_projector_from_embeddings,
    load_projector,
    projector_cache_path,
    read_captions,
    retrieval_scores,
    save_projector,
)
from .tower import (
    AUDIO_MODEL_DIRNAME,
    ClapAudioTower,
    LogMel,
    load_audio_tower,
    model_dir_audio_model,
    model_dir_of,
)

__all__ = [
    "AUDIO_MODEL_DIRNAME",
    "DEFAULT_AUDIO_MODEL",
    "PROJECTOR_FILENAME",
    "Clap",
    "ClapAudioTower",
    "FitSettings",
    "LogMel",
    "Projector",
    "captions_digest",
    "fit_projector",
    "fit_projector_from_embeddings",
    "load_audio_tower",
    "load_clap",
    "load_projector",
    "model_dir_audio_model",
    "model_dir_of",
    "projector_cache_path",
    "read_captions",
    "retrieval_scores",
    "save_clap",
    "save_projector",
]
