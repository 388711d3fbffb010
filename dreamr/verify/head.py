"""A trained verdict head: two rows over the target's final hidden state, scored by the fused CPN op.

The judge's own Yes/No rows of the LM head are one linear map of the hidden state at the verdict
position; a verdict head is another, fitted on labelled good and bad steps (``python -m dreamr.calibrate
fit``). It has the same shape as two LM-head rows, ``weight [2, H]`` and ``bias [2]`` with row 0 the
positive verdict and row 1 the negative, so :func:`dreamr.ops.cpn_verify` scores it unchanged with
``positive_ids=[0]``, ``negative_ids=[1]``: verification still never forms ``[B, V]`` logits.

Contextual calibration (see ``docs/method.md``): the verdict margin ``l = logsumexp(l[P]) -
logsumexp(l[N])`` is corrected by the margin on a content-free step at the same prefix,
``cpn_cal = sigmoid(l - l_null)``. For a linear head ``l(h) - l(h_null) = l(h - h_null)`` with the bias
left out, so a calibrated head is scored by the same op on ``h - h_null``; a head fitted on those
differences (``calibrated`` in its metadata) is only meaningful that way.

Files (a folder): ``head.safetensors`` (``weight``, ``bias``, float32) and ``head.json`` (the target's
identity, the verdict template and chat framing, the features, the fit's figures, the command and
seed). :meth:`VerdictHead.load` with a model refuses a head fitted for another target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = [
    "NULL_STEP",
    "HEAD_WEIGHTS",
    "HEAD_META",
    "HEAD_FORMAT",
    "VerdictHead",
    "target_identity",
    "margin_from_cpn",
    "calibrated_cpn",
    "shipped_head_dir",
]

NULL_STEP = "N/A"
"""The content-free step whose verdict calibrates a step's verdict at the same prefix."""

HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"
HEAD_FORMAT = 1

# The LM-head rows probed for the target's fingerprint: fixed fractions of the vocabulary, first values.
_PROBE_FRACTIONS = (0.25, 0.5, 0.75)
_PROBE_WIDTH = 8


def _lm_head_weight(model) -> torch.Tensor:
    from dreamr.lm import lm_head_of

    return lm_head_of(model, arg="verdict_head").weight  # the target is identified by its LM head


def _text_config(model):
    from dreamr.lm import text_config
    return text_config(model)


def target_identity(model, name: Optional[str] = None) -> dict:
    """What identifies a target for a verdict head: model type, hidden size, vocabulary, layers, and a
    fingerprint of its LM head (a few values of three rows, and a sha256 of those rows in bfloat16).

    The probe values are compared with a tolerance (:meth:`VerdictHead.check_target`), so a target
    loaded in another dtype still matches; the hash tells whether the rows are exactly the same.
    """
    config = _text_config(model)
    weight = _lm_head_weight(model).detach()
    vocab = int(weight.shape[0])
    rows = [min(vocab - 1, int(vocab * f)) for f in _PROBE_FRACTIONS]
    probe_rows = weight[rows].to("cpu", torch.float32)
    digest = hashlib.sha256(probe_rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest()
    return {
        "name": name,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": int(weight.shape[1]),
        "vocab_size": vocab,
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "lm_head_probe_rows": rows,
        "lm_head_probe": [round(float(v), 6) for v in probe_rows[:, :_PROBE_WIDTH].reshape(-1)],
        "lm_head_sha256_bf16": digest,
    }


def margin_from_cpn(cpn: torch.Tensor) -> torch.Tensor:
    """The verdict margin ``l`` with ``cpn = sigmoid(l)``, in float64 (inf where cpn is 0 or 1; NaN stays)."""
    c = cpn.to(torch.float64)
    return torch.log(c) - torch.log1p(-c)


def calibrated_cpn(cpn: torch.Tensor, cpn_null: torch.Tensor) -> torch.Tensor:
    """Contextual calibration of LM-head verdicts: ``sigmoid(l - l_null)`` from ``cpn`` and the null step's
    ``cpn_null`` at the same prefix (float32, shape of ``cpn``).

    A verdict equal to the null's gives 0.5. The margins come back from float32 cpn values, which are
    exact enough while the cpn lies well inside (0, 1); where the step's and the null's cpn saturate
    together (both 1 or both 0) the difference is undefined and the result is 0.5 (the judge could not
    tell them apart); NaN (a non-finite verdict) stays NaN.
    """
    diff = margin_from_cpn(cpn) - margin_from_cpn(cpn_null)
    same = (cpn == cpn_null) & ~torch.isnan(cpn)
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return torch.sigmoid(diff).to(torch.float32)


def shipped_head_dir(name: str) -> Optional[Path]:
    """The folder of the head shipped for built-in target ``name`` (``dreamr/heads/<name>/``), or None."""
    folder = Path(__file__).resolve().parent.parent / "heads" / str(name).lower()
    return folder if (folder / HEAD_META).is_file() and (folder / HEAD_WEIGHTS).is_file() else None


def resolve_verdict_head(choice, target_name: str):
    """A ``verdict_head`` setting as the front reads it (``from_pretrained``, ``--verdict-head``, SAPO's judge).

    "auto" is the head shipped for a built-in target (:func:`shipped_head_dir`; None for any other
    target), "none" / "" / None is None (the target's own Yes/No verdict), anything else (a folder, a
    :class:`VerdictHead`) is returned as it is, to be loaded and checked against the target later.
    """
    from dreamr import models

    if choice is None or (isinstance(choice, str) and choice.strip().lower() in ("", "none")):
        return None
    if isinstance(choice, str) and choice == "auto":
        name = str(target_name).lower()
        return shipped_head_dir(name) if name in models.BUILTIN_MODELS else None
    return choice


@dataclass
class VerdictHead:
    """A ``[2, H]`` verdict head (row 0 positive, row 1 negative) with its metadata.

    Attributes
    ----------
    weight : Tensor, shape ``[2, H]``, float32
    bias : Tensor, shape ``[2]``, float32
    calibrated : bool
        Fitted on ``h - h_null`` (the null step's hidden state at the same prefix subtracted): score it
        with the null step (:meth:`cpn` with ``null_hidden``).
    meta : dict
        ``head.json``'s content: ``target`` (:func:`target_identity`), ``template``, ``framing``,
        ``features``, ``null_step``, ``fit`` (held-out figures), ``command``, ``seed``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    calibrated: bool = False
    meta: dict = field(default_factory=dict)

    positive_ids = (0,)
    negative_ids = (1,)

    def __post_init__(self):
        w, b = self.weight, self.bias
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != 2 or w.shape[1] < 1:
            raise ValueError(f"verdict_head: weight must be a [2, H] tensor, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (2,):
            raise ValueError(f"verdict_head: bias must be a [2] tensor, got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        self.weight = w.detach().to(torch.float32).contiguous()
        self.bias = b.detach().to(torch.float32).contiguous()
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
            raise ValueError("verdict_head: weight and bias must be finite")
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_direction(cls, direction: torch.Tensor, offset: float = 0.0, *, calibrated: bool = False,
                       meta: Optional[dict] = None) -> "VerdictHead":
        """The head whose verdict margin is ``direction . h + offset`` (``direction [H]``): rows
        ``+direction/2`` and ``-direction/2``, biases ``+offset/2`` and ``-offset/2``."""
        d = direction.detach().to(torch.float64).reshape(-1)
        weight = torch.stack([d / 2, -d / 2])
        bias = torch.tensor([offset / 2, -offset / 2], dtype=torch.float64)
        return cls(weight, bias, calibrated=calibrated, meta=dict(meta or {}))

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def template(self) -> Optional[str]:
        return self.meta.get("template")

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._on.get(device)
        if got is None:
            got = self._on[device] = (self.weight.to(device), self.bias.to(device))
        return got

    def _check_hidden(self, hidden: torch.Tensor, name: str) -> None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"{name}: expected hidden states [B, {self.hidden_size}] (the head's hidden size), "
                             f"got {shape}")

    @torch.no_grad()
    def cpn(self, hidden: torch.Tensor, alpha: float, null_hidden: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """CPN and acceptance of final hidden states ``hidden [B, H]`` through :func:`dreamr.ops.cpn_verify`.

        With ``null_hidden`` (``[B, H]`` or ``[1, H]``: the null step's hidden state at each prefix) the
        verdict is calibrated: the op scores ``hidden - null_hidden`` without the bias, which is
        ``l(h) - l(h_null)``. Returns ``(cpn [B] float32, accept [B] bool)``.
        """
        from dreamr import ops

        self._check_hidden(hidden, "hidden")
        weight, bias = self._tensors(hidden.device)
        h = hidden.to(torch.float32)
        if null_hidden is not None:
            self._check_hidden(null_hidden, "null_hidden")
            h = h - null_hidden.to(device=hidden.device, dtype=torch.float32)
            bias = None
        return ops.cpn_verify(h.contiguous(), weight, self.positive_ids, self.negative_ids, alpha,
                              lm_head_bias=bias)

    def reference_cpn(self, hidden: torch.Tensor, null_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same cpn in plain PyTorch (float64 margins), for tests: ``sigmoid((w0 - w1) . h + b0 - b1)``."""
        w = self.weight.to(torch.float64)
        h = hidden.to(torch.float64).cpu()
        if null_hidden is not None:
            h = h - null_hidden.to(torch.float64).cpu()
            margin = h @ (w[0] - w[1])
        else:
            margin = h @ (w[0] - w[1]) + float(self.bias[0] - self.bias[1])
        return torch.sigmoid(margin).to(torch.float32)

    # -- files --------------------------------------------------------------------------------------

    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``head.safetensors`` and ``head.json`` into ``folder`` (created); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous()},
                  str(folder / HEAD_WEIGHTS))
        meta = dict(self.meta)
        meta.update(format=HEAD_FORMAT, calibrated=bool(self.calibrated), hidden_size=self.hidden_size)
        (folder / HEAD_META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path], model=None, *, template: Optional[str] = None) -> "VerdictHead":
        """Read a head folder; with ``model`` (the target), check it was fitted for that target.

        Raises ValueError naming ``verdict_head`` where the folder or a file is missing or malformed, or
        (with ``model``) where the head is for another target (:meth:`check_target`), or (with
        ``template``) where it was fitted under another verdict template.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, weights_path = folder / HEAD_META, folder / HEAD_WEIGHTS
        if not meta_path.is_file() or not weights_path.is_file():
            raise ValueError(f"verdict_head: {str(folder)!r} is not a verdict head folder (it needs {HEAD_META} "
                             f"and {HEAD_WEIGHTS}; make one with python -m dreamr.calibrate fit)")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights_path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"verdict_head: cannot read the head in {str(folder)!r}: {exc}") from None
        if not isinstance(meta, dict) or "weight" not in tensors or "bias" not in tensors:
            raise ValueError(f"verdict_head: {str(folder)!r} holds no weight/bias head")
        if meta.get("format", HEAD_FORMAT) != HEAD_FORMAT:
            raise ValueError(f"verdict_head: {str(folder)!r} has head format {meta.get('format')!r}; this dreamr "
                             f"reads format {HEAD_FORMAT}")
        head = cls(tensors["weight"], tensors["bias"], calibrated=bool(meta.get("calibrated", False)), meta=meta)
        if model is not None:
            head.check_target(model)
        if template is not None:
            head.check_template(template)
        return head

    def check_target(self, model) -> None:
        """Raise ValueError naming ``verdict_head`` unless ``model`` is the target this head was fitted for:
        same hidden size, vocabulary, model type, layers and LM-head fingerprint (within a tolerance that
        admits another dtype)."""
        want = self.meta.get("target") or {}
        got = target_identity(model)
        where = f"the head{' for ' + repr(want.get('name')) if want.get('name') else ''}"
        if got["hidden_size"] != self.hidden_size:
            raise ValueError(f"verdict_head: {where} has hidden size {self.hidden_size} but the target's is "
                             f"{got['hidden_size']}; fit a head for this target with python -m dreamr.calibrate fit")
        for key in ("model_type", "vocab_size", "num_hidden_layers"):
            if want.get(key) is not None and got[key] is not None and want[key] != got[key]:
                raise ValueError(f"verdict_head: {where} was fitted for a target with {key}={want[key]!r}, but "
                                 f"this target has {key}={got[key]!r}; fit a head for this target with "
                                 "python -m dreamr.calibrate fit")
        probe = want.get("lm_head_probe")
        if probe is not None:
            if want.get("lm_head_probe_rows") != got["lm_head_probe_rows"] or len(probe) != len(got["lm_head_probe"]):
                raise ValueError(f"verdict_head: {where} cannot be matched to this target (another LM-head size)")
            a = torch.tensor(probe, dtype=torch.float64)
            b = torch.tensor(got["lm_head_probe"], dtype=torch.float64)
            scale = float(a.abs().max().clamp_min(1e-12))
            if not torch.allclose(a, b, rtol=2e-2, atol=2e-2 * scale):
                raise ValueError(f"verdict_head: {where} was fitted for another target (its LM-head fingerprint "
                                 f"differs from this {got['model_type']} model's); fit a head for this target with "
                                 "python -m dreamr.calibrate fit")

    def check_template(self, template: str) -> None:
        """Raise ValueError naming ``verdict_head`` where the head was fitted after another verdict prompt
        (its hidden states would be read at a different position of a different text)."""
        fitted = self.meta.get("template")
        if fitted is not None and fitted != template:
            raise ValueError(f"verdict_head: the head was fitted with verdict_template={fitted!r}, not {template!r}; "
                             "use that template, fit a head for this one, or pass verdict_head=None")

    def describe(self) -> dict[str, Any]:
        """A short summary for reports: target name, features, calibration, held-out figures."""
        fit = self.meta.get("fit") or {}
        return {"target": (self.meta.get("target") or {}).get("name"), "features": self.meta.get("features"),
                "calibrated": self.calibrated, "heldout": fit.get("heldout")}
