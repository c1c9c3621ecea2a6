"""Compose a two-tower open_clip model from unimodal pretrained towers (the start of LiT, Zhai et
al. 2022): an image tower and a text tower, each with its pretrained weights, joined by fresh
linear projections into a `dim`-d space, saved as an open_clip local-dir model that `finetune`
trains (`--method head`, then `lock-image`) and `--model DIR` indexes.

Tower specs:
  timm:NAME[.TAG]        a timm image model with timm's pretrained weights (downloaded by timm)
  timm:NAME@FILE         the same architecture with a local weights file (.safetensors or a torch
                         state dict); tensors are matched by name, else by position and shape
  open_clip:SPEC:image   the image tower of an open_clip model (any --model spec)
  hf:PATH_OR_ID          a Hugging Face text model (mean pooling)
  sentence-transformers:NAME   a sentence-transformers model (its own pooling; NAME without '/'
                         means sentence-transformers/NAME)
  open_clip:SPEC:text    the text tower of an open_clip model

The image preprocessing is the one the image weights were trained with: timm's data config for
the architecture/tag (e.g. [-1, 1] inputs for TensorFlow-ported EfficientNets), or the open_clip
model's own; `Preprocess` overrides it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelSpec
from ..errors import ModelError, UsageError

IMAGE_KINDS = ("timm", "open_clip")
TEXT_KINDS = ("hf", "sentence-transformers", "open_clip")
POOLERS = {"cls_token": "cls_pooler", "mean_tokens": "mean_pooler", "max_tokens": "max_pooler"}
# Keys of a tower that are its output projection: composing starts them fresh.
IMAGE_PROJECTIONS = ("proj", "head.", "attnpool.c_proj.")
TEXT_PROJECTIONS = ("text_projection", "proj.")


@dataclass(frozen=True)
class TowerSpec:
    kind: str  # timm | hf | sentence-transformers | open_clip
    name: str
    weights: Path | None = None  # timm:NAME@FILE
    part: str | None = None  # open_clip:SPEC:image|text

    @classmethod
    def parse(cls, text: str, role: str) -> TowerSpec:
        """`text` as an --image (role 'image') or --text ('text') tower spec."""
        option = f"--{role}"
        kinds = IMAGE_KINDS if role == "image" else TEXT_KINDS
        kind, sep, rest = text.partition(":")
        if not sep or not rest or kind not in kinds:
            raise UsageError(
                f"{option} {text!r}: expected "
                + " or ".join(f"{k}:NAME" for k in kinds)
                + (" (hf: and sentence-transformers: towers are text towers)" if role == "image"
                   else " (timm: towers are image towers)")
            )  # fmt: skip
        if kind == "open_clip":
            spec, _, part = rest.rpartition(":")
            if part != role or not spec:
                raise UsageError(f"{option} {text!r}: expected open_clip:SPEC:{role}")
            return cls(kind, spec, part=part)
        if kind == "timm" and "@" in rest:
            name, _, weights = rest.partition("@")
            path = Path(weights).expanduser()
            if not path.is_file():
                raise UsageError(f"{option} {text!r}: no weights file {path}")
            return cls(kind, name, weights=path)
        return cls(kind, rest)


@dataclass(frozen=True)
class Preprocess:
    """Overrides of the image tower's own preprocessing (None: keep it)."""

    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None


@dataclass
class Composed:
    out: Path
    model_cfg: dict
    preprocess_cfg: dict
    notes: list[str] = field(default_factory=list)  # how each tower's weights were found

    def to_dict(self) -> dict:
        return {"out": str(self.out), "model_cfg": self.model_cfg,
                "preprocess_cfg": self.preprocess_cfg, "notes": self.notes}  # fmt: skip


def compose(
    image: str,
    text: str,
    dim: int,
    out: Path,
    context_length: int = 77,
    preprocess: Preprocess | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Composed:
    """Build the composed model and write it to `out` (an open_clip local-dir model)."""
    import open_clip
    import torch

    from ..encoders.clip import save_model_dir

    image_spec, text_spec = TowerSpec.parse(image, "image"), TowerSpec.parse(text, "text")
    if dim < 1:
        raise UsageError("--dim must be at least 1")
    if context_length < 2:
        raise UsageError("--context-length must be at least 2")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty (use --overwrite to replace it)")
    notes: list[str] = []
    sources = {}  # open_clip models a tower is taken from, loaded once
    vision_cfg, prep = _vision_cfg(image_spec, sources)
    text_cfg = _text_cfg(text_spec, context_length, sources, notes)
    preprocess = preprocess or Preprocess()
    if image_spec.kind == "open_clip" and preprocess.size is not None:
        raise UsageError(
            "--image-size goes with timm image towers (an open_clip tower has its own)"
        )
    prep = _override(prep, preprocess)
    if image_spec.kind == "timm":
        vision_cfg["image_size"] = prep["size"][0]
    model_cfg = {"embed_dim": dim, "custom_text": True, "vision_cfg": vision_cfg,
                 "text_cfg": text_cfg}  # fmt: skip
    torch.manual_seed(seed)  # the fresh projections
    try:
        with _quiet_transformers():
            model = open_clip.CustomTextCLIP(
                embed_dim=dim, vision_cfg=vision_cfg, text_cfg=text_cfg
            )
    except Exception as e:  # noqa: BLE001 - timm/transformers raise many kinds
        raise ModelError(f"could not build the composed model: {_short(e)}") from e
    notes.insert(0, _load_image_weights(model, image_spec, sources))
    if text_spec.kind == "open_clip":
        notes.append(_load_part(model.text, sources[text_spec.name], "text", TEXT_PROJECTIONS))
    save_model_dir(model, model_cfg, out, prep)
    if "hf_tokenizer_name" in text_cfg:
        # open_clip reads a local-dir model's Hugging Face tokenizer from the directory itself
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(str(out))
    return Composed(out, model_cfg, prep, notes)


# --- image tower ----------------------------------------------------------------------------


def _vision_cfg(spec: TowerSpec, sources: dict) -> tuple[dict, dict]:
    """(vision_cfg, preprocess_cfg) of the image tower."""
    if spec.kind == "open_clip":
        model, cfg = _open_clip_source(spec.name, sources)
        return dict(cfg["vision_cfg"]), dict(model.visual.preprocess_cfg)
    import timm
    from timm.data import resolve_model_data_config

    arch = spec.name.split(".")[0]
    try:
        # the architecture's (or the tag's) pretrained config says how its inputs were made
        trunk = timm.create_model(spec.name, pretrained=False, num_classes=0)
    except Exception as e:  # noqa: BLE001 - RuntimeError "Unknown model", ...
        raise UsageError(f"--image timm:{spec.name}: {_short(e)}") from e
    data = resolve_model_data_config(trunk)
    vision_cfg = {"timm_model_name": arch, "timm_model_pretrained": False, "timm_pool": "avg",
                  "timm_proj": "linear"}  # fmt: skip
    prep = {"size": list(data["input_size"][1:]), "mean": list(data["mean"]),
            "std": list(data["std"]), "interpolation": data["interpolation"],
            "resize_mode": "shortest"}  # fmt: skip
    return vision_cfg, prep


def _override(prep: dict, o: Preprocess) -> dict:
    prep = dict(prep)
    if o.size is not None:
        prep["size"] = [o.size, o.size]
    elif not isinstance(prep["size"], list | tuple):
        prep["size"] = [prep["size"]] * 2
    for key in ("mean", "std"):
        value = getattr(o, key)
        if value is not None:
            prep[key] = list(value) * 3 if len(value) == 1 else list(value)
            if len(prep[key]) != 3:
                raise UsageError(f"--{key} takes one value or three (R,G,B)")
    if o.interpolation is not None:
        prep["interpolation"] = o.interpolation
    prep["size"] = [int(s) for s in prep["size"]]
    return prep


def _load_image_weights(model, spec: TowerSpec, sources: dict) -> str:
    if spec.kind == "open_clip":
        return _load_part(model.visual, sources[spec.name], "visual", IMAGE_PROJECTIONS)
    trunk = model.visual.trunk
    if spec.weights is None:
        import timm

        try:
            source = timm.create_model(spec.name, pretrained=True, num_classes=0).state_dict()
        except Exception as e:  # noqa: BLE001 - no network, unknown tag, ...
            raise ModelError(
                f"--image timm:{spec.name}: no pretrained weights ({_short(e)})"
            ) from e
        trunk.load_state_dict(source)
        return f"image: timm {spec.name} with timm's pretrained weights"
    return "image: " + load_weights_file(trunk, spec.weights, f"timm:{spec.name}")


def load_weights_file(module, path: Path, what: str) -> str:
    """Load a state dict file into `module`: by name when every name matches, else by position
    with equal shapes (a port of the same network under other names, e.g. EfficientNet-Lite0
    from efficientnet_pytorch into timm); tensors left over at the end (a classifier) are unused."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        source = load_file(str(path))
    else:
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code, corrupt files
            raise ModelError(f"{what}: cannot read {path} as a state dict ({_short(e)})") from e
        source = source.get("state_dict", source) if isinstance(source, dict) else source
    target = module.state_dict()
    if set(target) <= set(source):
        module.load_state_dict({k: source[k] for k in target})
        return f"{what} with {path} ({len(target)} tensors by name)"
    items = list(source.items())
    if len(items) < len(target):
        raise ModelError(f"{what}: {path} has {len(items)} tensors, the model needs {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), items, strict=False):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ModelError(
                f"{what}: {path} does not fit: {sk} {tuple(sv.shape)} where the model has "
                f"{tk} {tuple(tv.shape)}"
            )
        mapped[tk] = sv
    module.load_state_dict(mapped)
    unused = [k for k, _ in items[len(target) :]]
    left = f"; unused: {', '.join(unused[:4])}" if unused else ""
    return f"{what} with {path} ({len(target)} tensors by position{left})"


# --- text tower -----------------------------------------------------------------------------


def _text_cfg(spec: TowerSpec, context_length: int, sources: dict, notes: list) -> dict:
    if spec.kind == "open_clip":
        _, cfg = _open_clip_source(spec.name, sources)
        return dict(cfg["text_cfg"])
    name, pooler = spec.name, "mean_pooler"
    if spec.kind == "sentence-transformers":
        if "/" not in name and not Path(name).expanduser().is_dir():
            name = f"sentence-transformers/{name}"
        pooler = _sentence_pooler(name)
    if Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser().resolve())
    notes.append(f"text: {spec.kind} {name} ({pooler.replace('_', ' ')})")
    return {"hf_model_name": name, "hf_tokenizer_name": name, "hf_model_pretrained": True,
            "hf_proj_type": "linear", "hf_pooler_type": pooler,
            "context_length": context_length}  # fmt: skip


def _sentence_pooler(name: str) -> str:
    """The pooling a sentence-transformers model was trained with (its 1_Pooling/config.json)."""
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / "1_Pooling" / "config.json"
    else:
        from ..encoders import hub

        path = hub.fetch(name, "1_Pooling/config.json", f"text tower {name}", "--text")
    if path is None or not Path(path).is_file():
        return "mean_pooler"
    cfg = json.loads(Path(path).read_text())
    modes = [m for m in POOLERS if cfg.get(f"pooling_mode_{m}")]
    if len(modes) != 1:
        raise UsageError(f"--text {name}: pooling {modes or 'none'} is not supported")
    return POOLERS[modes[0]]


# --- towers taken from open_clip models -------------------------------------------------------


def _open_clip_source(spec: str, sources: dict):
    """(model, model_cfg) of the open_clip model `spec`, loaded once."""
    if spec not in sources:
        from ..encoders.clip import _model_cfg, create_open_clip

        parsed = ModelSpec.parse(spec)
        model, _, _ = create_open_clip(parsed)
        sources[spec] = (model, _model_cfg(parsed))
    return sources[spec]


def _load_part(target, source, part: str, projections: tuple[str, ...]) -> str:
    """Copy the `part` tower ('visual' or 'text') of the open_clip model `source` into `target`,
    all but its output projection."""
    model, _ = source
    state = model.state_dict()
    if part == "text" and not any(k.startswith("text.") for k in state):
        # a CLIP keeps its text tower at the top level, a CustomTextCLIP under `text.`
        tower = {k: v for k, v in state.items()
                 if not k.startswith("visual.") and not k.startswith("logit_")}  # fmt: skip
    else:
        tower = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
    tower = {k: v for k, v in tower.items() if not k.startswith(projections)}
    missing, unexpected = target.load_state_dict(tower, strict=False)
    missing = [k for k in missing if not k.startswith(projections)]
    if missing or unexpected:
        raise ModelError(
            f"the {part} tower does not fit the composed model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return f"{'image' if part == 'visual' else 'text'}: open_clip tower ({len(tower)} tensors)"


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report and a progress bar per model; the library never prints."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
