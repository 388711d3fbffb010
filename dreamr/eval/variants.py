"""Variants: what one column of an evaluation runs (a mode, an alpha, and the verifier's options).

A variant is written as a spec, ``MODE[@ALPHA][+OPTION...]``:

    target                          the target alone (baseline modes take no alpha)
    speculative@0.7                 a fixed threshold
    speculative@auto                the adaptive threshold (alpha="auto", see dreamr.verify.threshold)
    speculative@auto+target_acceptance=0.5+alpha_gamma=0.05
    speculative@0.7+calibrate       contextual calibration of the verdict (the null step at the same prefix)
    speculative@0.7+verdict_head=none          the target's own Yes/No verdict, no trained head
    fpsr@0.7+verdict_head=runs/head+calibrate  a head folder written by ``python -m dreamr.calibrate fit``

The options are :data:`VERIFIER_OPTIONS`, the :class:`dreamr.config.ReasonerConfig` fields of the
verifier; ``target_acceptance`` and ``alpha_gamma`` apply to alpha="auto" only. A mode given by name
alone is run once per alpha of the settings and once per verifier spec of ``EvalSettings.verifiers``
(``""`` or ``"default"``: the reasoner's own verifier), so fixed-alpha, auto-alpha, head and calibrated
variants run side by side in one evaluation, interleaved per problem.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dreamr.config import MODES, VERIFIED_MODES, ReasonerConfig
from dreamr.verify.threshold import check_gamma, check_target_acceptance
from dreamr.verify.verdicts import check_alpha

__all__ = ["BASELINE_MODES", "VERIFIER_OPTIONS", "AUTO_ONLY_OPTIONS", "Variant", "parse_alpha", "parse_verifier",
           "make_variants", "variant_config", "check_variants", "describe_verifier", "window_sizes",
           "shared_thresholds"]

BASELINE_MODES = tuple(m for m in MODES if m not in VERIFIED_MODES)  # target, draft, token
"""Modes without verification: run once, alpha does not apply. Every other mode is run once per alpha."""

VERIFIER_OPTIONS = ("verdict_head", "calibrate", "target_acceptance", "alpha_gamma")
"""The ReasonerConfig fields a variant may set for its verifier, in the order a variant's name lists them."""

AUTO_ONLY_OPTIONS = ("target_acceptance", "alpha_gamma")
"""Options of the adaptive threshold: a variant with a fixed alpha refuses them."""

_DEFAULT_VERIFIER = ("", "default")


def parse_alpha(value, name: str = "alphas") -> Union[float, str]:
    """An alpha as a float in [0, 1], or "auto"; ValueError naming ``name`` otherwise."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number in [0, 1] or 'auto', got {value!r}") from None
    return check_alpha(value, name)


def _option(item: str, where: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if key not in VERIFIER_OPTIONS:
        raise ValueError(f"{where}: unknown verifier option {key!r}; known options: {list(VERIFIER_OPTIONS)} "
                         "(e.g. speculative@0.7+calibrate, speculative@auto+target_acceptance=0.5)")
    if key == "calibrate":
        if not sep or raw.lower() in ("1", "true", "yes", "on"):
            return key, True
        if raw.lower() in ("0", "false", "no", "off"):
            return key, False
        raise ValueError(f"{where}: calibrate must be 'calibrate', 'calibrate=true' or 'calibrate=false', got {item!r}")
    if not raw:
        raise ValueError(f"{where}: option {key!r} needs a value ({key}=...)")
    if key == "verdict_head":
        return key, None if raw.lower() == "none" else raw
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{where}: {key} must be a number, got {raw!r}") from None
    check = check_target_acceptance if key == "target_acceptance" else check_gamma
    return key, check(number, f"{where}: {key}")


def parse_verifier(spec: str, where: str = "verifiers") -> tuple[tuple[str, Any], ...]:
    """Verifier options from ``"OPTION[+OPTION...]"`` ("" or "default": none), in canonical order.

    Parameters
    ----------
    spec : str
        e.g. ``"calibrate"``, ``"verdict_head=none"``, ``"verdict_head=runs/head+calibrate"``.
    where : str
        The argument named in errors.

    Returns
    -------
    tuple of (str, value) pairs
        Ordered as :data:`VERIFIER_OPTIONS`; values parsed (bool, float, a folder or None).
    """
    if not isinstance(spec, str):
        raise ValueError(f"{where}: expected a verifier spec string, got {spec!r}")
    if spec.strip().lower() in _DEFAULT_VERIFIER:
        return ()
    options: dict[str, Any] = {}
    for item in spec.split("+"):
        key, value = _option(item, f"{where} {spec!r}")
        if key in options:
            raise ValueError(f"{where} {spec!r}: option {key!r} is given twice")
        options[key] = value
    return tuple((k, options[k]) for k in VERIFIER_OPTIONS if k in options)


def _option_text(key: str, value: Any) -> str:
    if key == "calibrate":
        return "calibrate" if value else "calibrate=false"
    if key == "verdict_head":
        return f"verdict_head={'none' if value is None else value}"
    return f"{key}={value:g}"


@dataclass(frozen=True)
class Variant:
    """One mode at one alpha (None for the baseline modes, a number in [0, 1] or "auto") with its
    verifier options (``verifier``: (ReasonerConfig field, value) pairs; empty: the reasoner's own)."""

    mode: str
    alpha: Optional[Union[float, str]] = None
    verifier: tuple = ()

    def __post_init__(self):
        if self.mode in BASELINE_MODES and (self.alpha is not None or self.verifier):
            raise ValueError(f"modes: mode {self.mode!r} does not verify; it takes no alpha or verifier options")
        names = [k for k, _ in self.verifier]
        unknown = sorted(set(names) - set(VERIFIER_OPTIONS))
        if unknown:
            raise ValueError(f"verifier: unknown option(s) {unknown}; known options: {list(VERIFIER_OPTIONS)}")
        auto_only = [k for k in names if k in AUTO_ONLY_OPTIONS]
        if auto_only and self.alpha != "auto":
            raise ValueError(f"variant {self.mode}@{self.alpha}: {auto_only} apply to alpha='auto' only "
                             f"(e.g. {self.mode}@auto+{auto_only[0]}=...)")

    @property
    def auto(self) -> bool:
        """The variant runs the adaptive threshold (alpha="auto")."""
        return self.alpha == "auto"

    @property
    def series(self) -> str:
        """The name without the alpha: the variants of one curve of the alpha sweep."""
        return self.mode + "".join("+" + _option_text(k, v) for k, v in self.verifier)

    @property
    def name(self) -> str:
        if self.alpha is None:
            return self.series
        alpha = self.alpha if isinstance(self.alpha, str) else format(self.alpha, "g")
        return f"{self.mode}@{alpha}" + self.series[len(self.mode):]

    def overrides(self) -> dict:
        """The ``generate`` settings of the variant: mode, alpha and the verifier options."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        out.update(self.verifier)
        return out


def make_variants(modes: Union[str, Sequence[str]], alphas: Union[float, str, Sequence] = (0.7,),
                  verifiers: Union[str, Sequence[str]] = ()) -> list[Variant]:
    """The variants of ``modes``: baseline modes once each, every other mode once per alpha and verifier.

    Parameters
    ----------
    modes : str or list of str
        Mode names (keys of :data:`dreamr.engines.ENGINES`) or variant specs ``MODE@ALPHA[+OPTION...]``
        (see the module docstring); a spec with an alpha is one variant per verifier spec (one variant
        when it has options of its own).
    alphas : number, "auto" or a list of them
        The alphas of the verifying modes given by name.
    verifiers : str or list of str
        Verifier specs (:func:`parse_verifier`) crossed with the verifying modes that carry no options of
        their own; empty: the reasoner's own verifier only.

    Returns
    -------
    list of Variant
        In the order given, duplicates dropped.

    Raises
    ------
    ValueError
        Naming the bad mode, alpha or verifier option.
    """
    from dreamr.engines import ENGINES

    if isinstance(modes, str):
        modes = [modes]
    if isinstance(alphas, (int, float, str)) and not isinstance(alphas, bool):
        alphas = [alphas]
    if isinstance(verifiers, str):
        verifiers = [verifiers]
    if not modes:
        raise ValueError("modes is empty")
    alpha_values = [parse_alpha(a, "alphas") for a in alphas]
    verifier_options = [parse_verifier(v, "verifiers") for v in verifiers] or [()]
    out: list[Variant] = []
    for spec in modes:
        if not isinstance(spec, str):
            raise ValueError(f"modes: unknown mode {spec!r}; known modes: {sorted(ENGINES)}")
        head, *options = spec.split("+")
        mode, at, alpha_text = head.partition("@")
        if mode not in ENGINES:
            raise ValueError(f"modes: unknown mode {mode!r}; known modes: {sorted(ENGINES)}")
        if mode in BASELINE_MODES:
            if at or options:
                raise ValueError(f"modes: {spec!r}: mode {mode!r} does not verify; it takes no alpha or verifier "
                                 "options")
            items = [Variant(mode)]
        else:
            if at:
                try:
                    spec_alphas = [parse_alpha(alpha_text, "alpha")]
                except ValueError as exc:
                    raise ValueError(f"modes {spec!r}: {exc}") from None
            elif alpha_values:
                spec_alphas = alpha_values
            else:
                raise ValueError(f"alphas is empty but mode {mode!r} needs an alpha")
            own = parse_verifier("+".join(options), f"modes {spec!r}") if options else None
            items = []
            for a in spec_alphas:
                for opts in ([own] if own is not None else verifier_options):
                    if a != "auto" and own is None:  # crossing: auto-only options stay with the auto alphas
                        if any(k in AUTO_ONLY_OPTIONS for k, _ in opts):
                            continue
                    items.append(Variant(mode, a, opts))
            if not items:
                raise ValueError(f"modes: {spec!r}: every verifier spec sets {list(AUTO_ONLY_OPTIONS)}, which "
                                 "apply to alpha='auto' only; add 'auto' to alphas")
        for v in items:
            if v not in out:
                out.append(v)
    return out


def variant_config(variant: Variant, settings, reasoner=None) -> ReasonerConfig:
    """The :class:`ReasonerConfig` a variant's ``generate`` calls run with.

    With ``reasoner`` (anything with the reasoner's ``_config(overrides)`` builder) through its own
    builder, which also checks the verdict words and the verdict head on its models; else over the
    reasoner's ``config`` where it has one; else a plain ReasonerConfig (the command line, before
    loading models), which checks names and values without models. ValueError names the setting.
    """
    fields = {f.name for f in dataclasses.fields(ReasonerConfig)}
    overrides = {**variant.overrides(), **settings.generation()}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"extra: unknown setting(s) {unknown} for variant {variant.name}; "
                         f"ReasonerConfig has {sorted(fields)}")
    builder = getattr(reasoner, "_config", None)
    if callable(builder):
        return builder(overrides)
    base = getattr(reasoner, "config", None)
    if isinstance(base, ReasonerConfig):
        return dataclasses.replace(base, **overrides)
    return ReasonerConfig(**overrides)


def check_variants(variants: Sequence[Variant], settings, reasoner=None) -> None:
    """Raise ValueError naming the variant and setting unless every variant's call settings are valid
    (built with :func:`variant_config` before any work)."""
    for v in variants:
        try:
            variant_config(v, settings, reasoner)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith("extra:") else f"variant {v.name}: {message}") from None


def _head_info(head) -> dict:
    """Name, calibration and held-out figures of a verdict head (an object or a folder's head.json)."""
    if head is None:
        return {}
    describe = getattr(head, "describe", None)
    if callable(describe):
        return describe()
    meta_path = Path(str(head)) / "head.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {"folder": str(head)}
    fit = meta.get("fit") or {}
    return {"target": (meta.get("target") or {}).get("name"), "features": meta.get("features"),
            "calibrated": bool(meta.get("calibrated", False)), "heldout": fit.get("heldout"), "folder": str(head)}


def describe_verifier(variant: Variant, settings, reasoner=None) -> Optional[dict]:
    """Which verifier a variant judges with, for the report (None for the baseline modes).

    Returns
    -------
    dict or None
        ``label`` (short, for the table: "yes/no" for the target's own verdict words or
        "head:<target>" for a trained verdict head, "+cal" with contextual calibration, then the
        threshold "alpha=0.7" or "auto->0.5"), ``id`` (the label with the head's folder: records of
        another verifier are not resumed into this variant), ``judge``, ``verdict_head`` (folder or
        None), ``head`` (its name, features, held-out figures), ``calibrate``, ``alpha``,
        ``target_acceptance`` and ``alpha_gamma`` (alpha="auto" only).
    """
    if variant.mode not in VERIFIED_MODES:
        return None
    config = variant_config(variant, settings, reasoner)
    verifier_for = getattr(reasoner, "verifier_for", None)
    verifier = verifier_for(config) if callable(verifier_for) else None
    head = getattr(verifier, "head", None) if verifier is not None else config.verdict_head
    info = _head_info(head)
    # A head fitted on calibrated features calibrates whatever config.calibrate says (dreamr.config).
    calibrate = bool(getattr(verifier, "calibrate", config.calibrate or info.get("calibrated", False)))
    judge = "yes/no" if head is None else f"head:{info.get('target') or Path(str(head)).name}"
    threshold = (f"auto->{config.target_acceptance:g}" if config.auto_alpha else f"alpha={config.alpha:g}")
    label = judge + ("+cal" if calibrate else "")
    folder = config.verdict_head if isinstance(config.verdict_head, (str, Path)) else info.get("folder")
    out = {
        "label": f"{label} {threshold}",
        "id": f"{label} {threshold} {folder or ''}".strip(),
        "judge": "the target's verdict words (Yes/No logits)" if head is None else "a trained verdict head",
        "verdict_head": None if folder is None else str(folder),
        "head": info or None,
        "calibrate": calibrate,
        "alpha": config.alpha,
    }
    if config.auto_alpha:
        out.update(target_acceptance=config.target_acceptance, alpha_gamma=config.alpha_gamma)
    return out


def window_sizes(reasoner, settings, variants: Sequence[Variant]) -> dict:
    """Window size W of the variants whose mode uses lookahead windows (the ``window`` setting of the
    settings' extras, else of the reasoner's config)."""
    out = {}
    for v in variants:
        if v.mode in BASELINE_MODES or v.mode == "speculative":
            continue
        w = settings.extra.get("window", getattr(getattr(reasoner, "config", None), "window", None))
        if isinstance(w, int) and not isinstance(w, bool) and w >= 1:
            out[v.name] = w
    return out


def shared_thresholds(variants: Sequence[Variant]) -> list[list[str]]:
    """Groups of alpha="auto" variants that share one adaptive threshold in the reasoner: the reasoner
    keeps one per verifier and target acceptance (``SpeculativeReasoner.threshold_for``), so variants
    that differ only in their mode update the same alpha."""
    groups: dict[tuple, list[str]] = {}
    for v in variants:
        if v.auto:
            groups.setdefault(v.verifier, []).append(v.name)
    return [names for names in groups.values() if len(names) > 1]
