"""open_clip image and text towers (torch). Imported only where torch is needed."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import EncoderOptions, ImagePrep, ModelSpec
from ..errors import ModelError
from .base import Encoder, EncoderIdentity, Tower


def device_type(device: str) -> str:
    """The device's kind ("cuda" for "cuda:1"): what autocast, GradScaler and the precision
    defaults go by."""
    return device.partition(":")[0]


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        if device_type(device) == "cuda" and not torch.cuda.is_available():
            raise ModelError("--device cuda was asked for, but torch sees no CUDA device")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ModelError("--device mps was asked for, but torch sees no MPS device")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(device: str, precision: str):
    import torch

    if precision == "auto":
        if device_type(device) == "cuda":
            precision = "fp16"
        elif device == "cpu" and cpu_has_native_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


MODEL_FORMS = "NAME:TAG (e.g. ViT-B-32:laion2b_s34b_b79k), hf-hub:org/repo or a model directory"
OPEN_CLIP_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def checkpoint_path(spec: ModelSpec) -> Path:
    """The safetensors weights open_clip will load for this spec: from the model directory, else
    from the Hugging Face cache, else downloaded (one short try; see `hub`). Unknown names and
    tags, an unreachable hub and pickle-only weights are a one-line ModelError."""
    from open_clip import factory, pretrained

    from . import hub

    what = f"model {spec}"
    if spec.is_local:
        found = factory._find_checkpoint_in_dir(spec.local_path)
        if not found:
            raise ModelError(
                f"no weights in {spec.local_path}: expected open_clip_model.safetensors beside "
                "open_clip_config.json"
            )
        if not found.endswith(hub.SAFE_SUFFIX):
            raise ModelError(hub.pickle_message(found))
        return Path(found)
    if spec.name.startswith("hf-hub:"):
        repo = spec.name[len("hf-hub:") :]
        if hub.fetch(repo, "open_clip_config.json", what, "--model") is None:
            raise ModelError(
                f"{what}: {repo} has no open_clip_config.json (not an open_clip model)"
            )
        return hub.fetch_weights(repo, OPEN_CLIP_WEIGHTS, what, "--model")
    _check_known_name(spec.name)
    tags = pretrained.list_pretrained_tags_by_model(spec.name)
    if spec.pretrained is None:
        if not tags:
            raise ModelError(f"model {spec.name} has no published weights; {_forms()}")
        raise ModelError(
            f"model {spec.name} needs a weights tag (NAME:TAG); known tags: {', '.join(tags)}"
        )
    cfg = pretrained.get_pretrained_cfg(spec.name, spec.pretrained)
    if cfg:
        return _tag_weights(spec, cfg, what)
    given = Path(spec.pretrained).expanduser()
    if given.is_file():
        if given.suffix != hub.SAFE_SUFFIX:
            raise ModelError(hub.pickle_message(str(given)))
        return given
    close = _close(spec.pretrained, tags)
    raise ModelError(
        f"unknown weights tag {spec.pretrained!r} for {spec.name}"
        + (f" (did you mean {close}?)" if close else "")
        + f"; known tags: {', '.join(tags) or 'none'}"
    )


def _tag_weights(spec: ModelSpec, cfg: dict, what: str) -> Path:
    import os

    from open_clip import pretrained

    from . import hub

    if cfg.get("file"):
        local = Path(cfg["file"])
        if local.suffix != hub.SAFE_SUFFIX:
            raise ModelError(hub.pickle_message(str(local)))
        return local
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        filename = filename or pretrained.HF_WEIGHTS_NAME
        names = list(dict.fromkeys([*pretrained._get_safe_alternatives(filename), filename]))
        return hub.fetch_weights(repo, names, what, "--model")
    url = cfg.get("url", "")
    if url.endswith(hub.SAFE_SUFFIX):
        return Path(pretrained.download_pretrained(cfg))
    raise ModelError(hub.pickle_message(f"{what} ({url or 'no file'})"))


def _check_known_name(name: str) -> None:
    import open_clip

    names = open_clip.list_models()
    if name in names:
        return
    close = _close(name, names)
    raise ModelError(
        f"unknown model {name!r}" + (f" (did you mean {close}?)" if close else "") + f"; {_forms()}"
    )


def _forms() -> str:
    return f"--model takes {MODEL_FORMS}"


def _close(word: str, choices: list[str]) -> str:
    """Up to three close matches (case-insensitive; names it begins first), as 'A, B or C'."""
    import difflib

    by_lower = {c.lower(): c for c in choices}
    key = word.lower()
    found = [c for c in by_lower if c.startswith(key)]
    found += difflib.get_close_matches(key, list(by_lower), n=3)
    found = [by_lower[c] for c in dict.fromkeys(found)][:3]
    if len(found) > 1:
        return ", ".join(found[:-1]) + " or " + found[-1]
    return found[0] if found else ""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _prep_from(cfg: dict) -> ImagePrep:
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    return ImagePrep(
        size=(int(size[0]), int(size[1])),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
        fill_color=int(cfg.get("fill_color", 0)),
    )


class ClipTextTower(Tower):
    def __init__(self, model, tokenizer, device: str, dtype):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.context_length = int(getattr(model, "context_length", 77) or 77)
        # open_clip pads every text to the context length. With a causal mask and argmax pooling
        # the padding cannot influence the pooled token, so the batch is cut to its longest text.
        self.trim = (
            getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "positional_embedding")
        )

    def embed_batch(self, batch: Sequence[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(list(batch)).to(self.device)
        with torch.inference_mode():
            if self.trim:
                x = self._encode_trimmed(tokens)
            else:
                x = self.model.encode_text(tokens)
        return x.float().cpu().numpy()

    def _encode_trimmed(self, tokens):
        import torch

        m = self.model
        # the end-of-text token has the largest id, and id 0 is a real token ('!'), not padding
        length = int(tokens.argmax(dim=1).max()) + 1
        tokens = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection if m.text_projection is not None else x

    def count_tokens(self, text: str) -> int:
        """Tokens the text occupies, without start/end tokens."""
        tok = self.tokenizer
        if hasattr(tok, "encode"):
            return len(tok.encode(text))
        return int((tok([text]) != 0).sum()) - 2


class ClipImageTower(Tower):
    def __init__(self, model, prep: ImagePrep, device: str, dtype):
        import torch

        self.model, self.prep, self.device, self.dtype = model, prep, device, dtype
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255

    def embed_batch(self, batch: Sequence) -> np.ndarray:
        """uint8 (H, W, 3) pictures: numpy arrays, or tensors already on the device (JPEGs
        decoded there, loaders.gpu_jpeg)."""
        import torch

        if all(isinstance(b, np.ndarray) for b in batch):  # one copy to the device
            x = torch.from_numpy(np.stack(batch)).to(self.device)
        else:
            x = torch.stack([torch.as_tensor(b).to(self.device) for b in batch])
        x = x.permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).to(self.dtype)
        with torch.inference_mode():
            y = self.model.encode_image(x)
        return y.float().cpu().numpy()


def create_open_clip(spec: ModelSpec, device: str = "cpu"):
    """(model, tokenizer, weights file) for `spec`, through open_clip's own factory once
    `checkpoint_path` has checked the spec and put the weights in place (safetensors only)."""
    import open_clip

    from . import hub

    ckpt = checkpoint_path(spec)
    repo = _model_cfg(spec).get("text_cfg", {}).get("hf_model_name")
    if repo and not os.path.isdir(repo):  # a hub text tower: open_clip reads its config.json
        hub.fetch(repo, "config.json", f"model {spec} (text tower {repo})", "--model")
    try:
        with hub.cache_only():  # open_clip fetches again what checkpoint_path just cached
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained, device=device)
        tokenizer = _tokenizer(spec)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in text:  # never pass on torch's advice to unpickle
            raise ModelError(hub.pickle_message(str(ckpt))) from e
        raise ModelError(f"could not load model {spec}: {text}") from e
    return model, tokenizer, ckpt


def _tokenizer(spec: ModelSpec):
    """The cached tokenizer; a Hugging Face tokenizer not yet cached is fetched (one short try)."""
    import open_clip

    from . import hub

    try:
        with hub.cache_only():
            return open_clip.get_tokenizer(spec.name)
    except Exception:  # noqa: BLE001 - a tokenizer from the hub, not cached yet
        repo = _model_cfg(spec).get("text_cfg", {}).get("hf_tokenizer_name")
        if hub.offline() or not repo or os.path.isdir(repo):
            raise
        hub.on_hub(repo, "tokenizer_config.json", f"model {spec} (tokenizer {repo})", "--model")
    with hub.quiet():
        return open_clip.get_tokenizer(spec.name)


def load_clip(spec: ModelSpec, options: EncoderOptions | None = None) -> Encoder:
    """Build the open_clip towers for `spec`; weights load from safetensors (no pickle)."""
    import torch

    options = options or EncoderOptions()
    device = pick_device(options.device)
    dtype = pick_dtype(device, options.precision)
    model, tokenizer, ckpt = create_open_clip(spec, device)
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
    prep = _prep_from(model.visual.preprocess_cfg)
    model_cfg = _model_cfg(spec)
    dim = int(model.text_projection.shape[1]) if _is_param(model, "text_projection") else None
    text = ClipTextTower(model, tokenizer, device, dtype)
    image = ClipImageTower(model, prep, device, dtype)
    if dim is None:
        dim = int(text.embed_batch(["a"]).shape[1])
    text.dim = image.dim = dim
    identity = {
        "spec": str(spec),
        "arch": hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16],
        "weights": file_digest(ckpt)[:16],
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        "preprocess": prep.to_dict(),
        "context_length": text.context_length,
        "dim": dim,
    }
    identity["key"] = f"{identity['arch']}-{identity['weights']}"
    return Encoder(
        identity=EncoderIdentity.from_dict(identity),
        dim=dim,
        text=text,
        image=image,
        model=model,
        tokenizer=tokenizer,
        prep=prep,
        device=device,
    )


def _is_param(model, name: str) -> bool:
    import torch

    p = getattr(model, name, None)
    return isinstance(p, torch.Tensor) and p.ndim == 2


def _model_cfg(spec: ModelSpec) -> dict:
    from open_clip import factory

    from . import hub

    if spec.is_local:
        return json.loads((spec.local_path / "open_clip_config.json").read_text())["model_cfg"]
    if spec.name.startswith("hf-hub:"):
        with hub.cache_only():  # fetched into the cache by checkpoint_path
            return factory._get_hf_config(spec.name[len("hf-hub:") :])["model_cfg"]
    return factory.get_model_config(spec.name) or {}


def save_model_dir(model, model_cfg: dict, out: Path, preprocess_cfg: dict | None = None) -> Path:
    """Write `model` in open_clip's local-dir layout: open_clip_config.json + safetensors weights.

    The result loads with `open_clip.create_model("local-dir:OUT")` and with `--model OUT`.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


def materialize_model_dir(spec: ModelSpec, out: Path, overwrite: bool = False) -> Path:
    """`out` as a self-contained local-dir copy of `spec` (fp32 weights), e.g. to add an audio
    projector beside a model that was not fine-tuned."""
    import shutil

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out} exists and is not empty (use --overwrite to replace it)")
    if spec.is_local:
        shutil.copytree(spec.local_path, out, dirs_exist_ok=True)
        return out
    enc = load_clip(spec, EncoderOptions(device="cpu", precision="fp32"))
    model = enc.model
    return save_model_dir(model, _model_cfg(spec), out, dict(model.visual.preprocess_cfg))
