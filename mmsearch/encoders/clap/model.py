"""CLAP (transformers' ClapModel): load it from a hub id or a local directory without printing,
refusing pickled weights; save a fine-tuned copy in from_pretrained layout; embed captions."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..base import l2_normalize

DEFAULT_AUDIO_MODEL = "laion/clap-htsat-unfused"
CLAP_MAX_TOKENS = 77  # LAION-CLAP tokenizes captions to 77 tokens


@dataclass
class Clap:
    """A loaded ClapModel with its tokenizer and feature-extractor settings."""

    model: object  # transformers.ClapModel
    tokenizer: object
    feature_extractor: object  # transformers.ClapFeatureExtractor (its settings; see log_mel)
    spec: str
    weights: str  # sha256 of the weights as loaded, 16 hex digits
    device: str
    dtype: object  # torch dtype the audio tower runs in

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, d) L2-normalised CLAP text embeddings (fp32)."""
        import torch

        text_model = self.model.text_model
        dev = next(text_model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=CLAP_MAX_TOKENS,
                return_tensors="pt",
            ).to(dev)
            with torch.inference_mode():
                y = self.model.get_text_features(
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                ).pooler_output
            out.append(y.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.concatenate(out))


def load_clap(audio_model: str = DEFAULT_AUDIO_MODEL, device: str = "cpu") -> Clap:
    """Load a transformers ClapModel (hub id or local directory) and its processor."""
    import torch

    from ..clip import pick_device

    device = pick_device(device)
    if audio_model.startswith("local-dir:"):  # the form manifests record local models in
        audio_model = audio_model[len("local-dir:") :]
    local = Path(audio_model).expanduser()
    source = str(local.resolve()) if local.is_dir() else audio_model
    if not local.is_dir() and _looks_like_path(audio_model):
        raise ModelError(
            f"could not load audio model {audio_model}: no such directory (--audio-model takes "
            "a Hugging Face id such as laion/clap-htsat-unfused, or a local model directory)"
        )
    try:
        with _quiet_transformers():
            model, processor = _from_pretrained(source, local.is_dir())
    except ModelError:
        raise
    except Exception as e:  # OSError offline/missing, ValueError/KeyError for a wrong directory
        from .. import hub

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in text:  # never pass on torch's advice to unpickle
            raise ModelError(hub.pickle_message(f"audio model {audio_model}")) from e
        raise ModelError(f"could not load audio model {audio_model}: {text}") from e
    model.eval()
    weights = _state_digest(model)
    # bf16 on CPU runs HTSAT ~6x slower than fp32 (window attention); fp16 only on CUDA.
    dtype = torch.float16 if device == "cuda" else torch.float32
    model.to(device)
    model.audio_model.to(dtype)
    model.audio_projection.to(dtype)
    return Clap(
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        spec=f"local-dir:{source}" if local.is_dir() else audio_model,
        weights=weights,
        device=device,
        dtype=dtype,
    )


def _looks_like_path(text: str) -> bool:
    """A directory meant, not a hub id ("org/name")."""
    return (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    )


def _from_pretrained(source: str, is_dir: bool):
    """ClapModel and ClapProcessor from a directory, or from a hub id: the cache first, then one
    short check that the hub answers (see `hub`) before transformers downloads it."""
    from transformers import ClapModel, ClapProcessor

    from .. import hub

    def load(**kw):
        return ClapModel.from_pretrained(source, **kw), ClapProcessor.from_pretrained(source, **kw)

    if is_dir:
        _refuse_pickle_dir(Path(source))
        return load()
    try:
        return load(local_files_only=True)
    except Exception:  # noqa: BLE001 - not (completely) in the cache
        pass
    what = f"audio model {source}"
    if not hub.on_hub(source, "config.json", what, "--audio-model"):
        raise ModelError(f"could not load {what}: {source} has no config.json on the hub")
    return load()


def _refuse_pickle_dir(folder: Path) -> None:
    from .. import hub

    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.suffix == hub.SAFE_SUFFIX for f in files):
        return  # transformers prefers the safetensors file
    pickled = sorted(f.name for f in files if f.suffix in hub.PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(hub.pickle_message(str(folder / pickled[0])))


def save_clap(clap: Clap, out: str | os.PathLike, audio_projection: dict | None = None) -> Path:
    """Write `clap` (fp32, with `audio_projection`'s state dict in place of its own if given) and
    its processor in from_pretrained layout, so `ClapModel.from_pretrained(out)` loads it. It is
    written beside `out` and moved into place: a crash never leaves a half-written `out`."""
    import copy
    import shutil

    from transformers import ClapProcessor

    out = Path(out)
    model = copy.deepcopy(clap.model).float().cpu()
    if audio_projection is not None:
        model.audio_projection.load_state_dict(audio_projection)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        model.save_pretrained(tmp)
        ClapProcessor(
            feature_extractor=clap.feature_extractor, tokenizer=clap.tokenizer
        ).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """Loading prints progress bars and warnings; the library never prints."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from .. import hub

    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()  # downloads
    hf_logging.set_verbosity_error()
    try:
        with hub.quiet():  # huggingface_hub's own retry and fallback warnings
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()


def _state_digest(model) -> str:
    """sha256 over the weights as loaded: names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]
