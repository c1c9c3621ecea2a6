"""The torch-free query text path: a numpy copy of a model's text tower, for cold-start searches.

Importing torch and open_clip costs seconds, and a query embeds one short text. The copy runs the
same transformer in numpy, with weights memory-mapped from .npy files, and tokenizes with a
re-implementation of the model's tokenizer that loads in milliseconds. The export proves the copy
agrees with the torch tower before it is used.

- tokenizer.py  open_clip's SimpleTokenizer (byte-level BPE) over token ids
- numpy_ops.py  activations, layer norm, one BLAS thread for small batches (shared by towers)
- tower.py      FastTextTower: open_clip's CLIP text transformer, loaded from an export
- export.py     the torch side: read the tower and tokenizer, write, verify against open_clip
- hf_tokenizer.py, hf_tower.py, hf_export.py  the same for encoder-only Hugging Face text towers
  (BERT, RoBERTa, XLM-R, MiniLM...), tokenized by the `tokenizers` library
- open_clip_export.py  an open_clip model's text tower through whichever exporter fits it
- torch_parts.py  the torch side both exporters share (layers to numpy, verify, publish)

Importing this package imports no torch. Each kind of tower writes its own `format` in
config.json; `load_fast_text` opens either.
"""

import json
from pathlib import Path

from .export import EMBED_SAMPLES, SAMPLE_TEXTS, export_fast_text, unsupported_reason
from .hf_tower import HF_FORMAT, HFFastTextTower
from .tokenizer import ClipBpeTokenizer
from .tower import FORMAT, FORMAT_VERSION, FastTextTower

__all__ = [
    "EMBED_SAMPLES",
    "FORMAT",
    "FORMAT_VERSION",
    "SAMPLE_TEXTS",
    "ClipBpeTokenizer",
    "FastTextTower",
    "HF_FORMAT",
    "HFFastTextTower",
    "load_fast_text",
    "export_fast_text",
    "unsupported_reason",
]


def load_fast_text(out_dir: Path) -> FastTextTower | HFFastTextTower:
    """Open an export of either kind (by the `format` its config.json names); ModelError if it
    is missing, incomplete or of an unknown format."""
    try:
        fmt = json.loads((Path(out_dir) / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    return (HFFastTextTower if fmt == HF_FORMAT else FastTextTower).load(out_dir)
