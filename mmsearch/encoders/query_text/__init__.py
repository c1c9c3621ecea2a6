"""The torch-free query text path: a numpy copy of a model's text tower, for cold-start searches.

Importing torch and open_clip costs seconds, and a query embeds one short text. The copy runs the
same transformer in numpy, with weights memory-mapped from .npy files, and tokenizes with a
re-implementation of the model's tokenizer that loads in milliseconds. The export proves the copy
agrees with the torch tower before it is used.

- tokenizer.py  open_clip's SimpleTokenizer (byte-level BPE) over token ids
- numpy_ops.py  activations, layer norm, one BLAS thread for small batches (shared by towers)
- tower.py      FastTextTower: open_clip's CLIP text transformer, loaded from an export
- export.py     the torch side: read the tower and tokenizer, write, verify against open_clip

Importing this package imports no torch. Another kind of text tower (e.g. a BERT-family encoder)
is a tower module and an export module of its own beside these, writing its own `format`.
"""

from .export import EMBED_SAMPLES, SAMPLE_TEXTS, export_fast_text, unsupported_reason
from .tokenizer import ClipBpeTokenizer
from .tower import FORMAT, FORMAT_VERSION, FastTextTower

__all__ = [
    "EMBED_SAMPLES",
    "FORMAT",
    "FORMAT_VERSION",
    "SAMPLE_TEXTS",
    "ClipBpeTokenizer",
    "FastTextTower",
    "export_fast_text",
    "unsupported_reason",
]
