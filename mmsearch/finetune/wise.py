"""Fine-tuning that does not forget: WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of
zero-shot models"), a weight-space mix of the model before and after fine-tuning,

    theta(alpha) = (1 - alpha) * theta_base + alpha * theta_fine-tuned,

with alpha chosen on held-out pairs: the highest recall on the user's held-out pairs among the
mixes whose recall on general retention pairs fell by at most `max_forgetting` (relative to the
base model's). alpha = 0 is the base model and alpha = 1 the fine-tuned one, bit for bit
(`torch.lerp` returns its ends exactly).

Only the trainable tensors are mixed: for `head` and `lora` those are the adapters (a delta of
zero is the base model), kept separate from the frozen weights until the final merge, so a mix
costs a few small tensors and, with frozen features cached, only the adapted suffix runs per
evaluation. For `lock-image` and `full` the trained weights themselves are mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .evaluate import Recall

GRID = tuple(i / 10 for i in range(11))
NOT_MEASURED = (
    "retention not measured (no --retain pairs, and no indexed photos to build them from): kept "
    "the fine-tuned model"
)


@dataclass
class MixReport:
    """What the mix was chosen from: per alpha the held-out target recall and the retention
    recall, and the alpha kept."""

    alpha: float
    max_forgetting: float
    curve: list[dict] = field(default_factory=list)  # per alpha: target, retention, forgetting
    note: str | None = None
    retention: str | None = None  # what the retention pairs are

    def row(self, alpha: float) -> dict:
        return next(r for r in self.curve if r["alpha"] == alpha)

    @property
    def measured(self) -> bool:
        return bool(self.curve) and self.curve[0]["retention"] is not None

    def recalls(self, what: str) -> dict[str, Recall]:
        """{"base", "fine-tuned", "mix"}: the `what` ("target" or "retention") recall of each."""
        picks = {"base": 0.0, "fine-tuned": 1.0, "mix": self.alpha}
        return {name: Recall.from_dict(self.row(a)[what]) for name, a in picks.items()}

    def to_dict(self) -> dict:
        out = {"alpha": self.alpha, "max_forgetting": self.max_forgetting, "curve": self.curve,
               "retention_pairs": self.retention}  # fmt: skip
        if self.curve:
            for what in ("target", "retention"):
                if self.curve[0][what] is not None:
                    out[what] = {k: r.to_dict() for k, r in self.recalls(what).items()}
        return {**out, **({"note": self.note} if self.note else {})}


def mix_state(start: dict, end: dict, alpha: float) -> dict:
    """The tensors of `start` and `end` mixed at `alpha` (0: `start`, 1: `end`, exactly).
    Integer tensors (BatchNorm's batch counters) take the nearer end."""
    import torch

    out = {}
    for k, a in start.items():
        b = end[k]
        if a.is_floating_point():
            out[k] = torch.lerp(a, b.to(a.dtype), float(alpha))
        else:
            out[k] = (b if alpha >= 0.5 else a).clone()
    return out


def forgetting(base: Recall, other: Recall) -> float:
    """The relative drop of the mean recall from `base` to `other` (0 when it did not drop)."""
    if base.mean <= 0:
        return 0.0
    return max(0.0, 1.0 - other.mean / base.mean)


def choose(curve: list[dict], max_forgetting: float) -> float:
    """The alpha with the best target mean recall among those forgetting at most
    `max_forgetting`; ties go to the smaller alpha (nearer the base). alpha 0 always qualifies."""
    ok = [r for r in curve if r["forgetting"] is None or r["forgetting"] <= max_forgetting + 1e-12]
    best = max(ok, key=lambda r: (round(r["target"]["mean"], 9), -r["alpha"]))
    return best["alpha"]


def wise_ft(encode, model, start: dict, best: dict, val, retain, max_forgetting: float,
            progress, grid=GRID) -> MixReport:  # fmt: skip
    """Evaluate the mixes of `start` and `best` (trainable tensors of `model`) on `val` and on
    `retain`, leave `model` at the chosen one and say what was chosen. Without `retain`, the
    fine-tuned model is kept and the report says retention was not measured."""
    if retain is None:
        model.load_state_dict(best, strict=False)
        return MixReport(1.0, max_forgetting, note=NOT_MEASURED)
    curve, base_retained = [], None
    for alpha in grid:
        model.load_state_dict(mix_state(start, best, alpha), strict=False)
        target, retained = encode.recall(val), encode.recall(retain)
        base_retained = base_retained or retained
        curve.append({
            "alpha": alpha, "target": target.to_dict(), "retention": retained.to_dict(),
            "forgetting": round(forgetting(base_retained, retained), 6),
        })  # fmt: skip
        progress("mix", alpha=alpha, target=target, retention=retained)
    alpha = choose(curve, max_forgetting)
    model.load_state_dict(mix_state(start, best, alpha), strict=False)
    return MixReport(alpha, max_forgetting, curve)
