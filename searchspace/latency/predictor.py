"""From the table's parts to a whole model's latency: features, fitted forms, and their held-out accuracy.

A plain sum of parts timed one by one misses what only a whole model pays, and what it misses depends on the model:
a fixed cost per part (code and data a part run alone in a loop keeps hot; it dominates at 32x32, where a block
takes tens of microseconds) and the cost of streaming the weights (a part alone keeps its few hundred KB in cache; a
whole model at 32x32 carries tens of MB, more than the last-level cache, and reads them from memory on every pass).
So each model is described by a few features of its parts (:class:`Features`): the sum of their table latencies, how
many there are, and the megabytes of weights they hold. A *form* is a choice of features (one also splits out the
parts on maps of at most 2x2 pixels, whose cost is mostly reading their weights); its coefficients are fitted by
least squares on the relative error of whole models measured for real, and each is judged *held out* (leave-one-out
over the measured models), never assumed. Forms with more coefficients need more models (:func:`min_models`).

Which form to trust is itself decided by held-out error, and with the 16 models of a first calibration that
decision is noisy: the form with the lowest leave-one-out error is often the luckiest, not the best on new models.
So the prediction is the mean of every form whose held-out error is within :data:`NEAR_BEST` of the best one's
(README.md gives what this gained on this kind of machine). Forms that predict much worse held out are left out;
with exact data only the forms that fit it exactly qualify, and of forms that predict alike the simplest.

The held-out predictions also give what a user needs to know before trusting a table: mean absolute percentage
error, the share within +-10%, and Kendall's tau of the ranking (:class:`Accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MixerNASError

# The forms, simplest first (ties go to the simpler): the features each one uses besides the sum of parts.
FORMS: dict[str, tuple[str, ...]] = {
    "scale": (),
    "offset": ("one",),
    "per_part": ("parts",),
    "weights": ("weight_mb",),
    "per_part+weights": ("parts", "weight_mb"),
    "full": ("parts", "weight_mb", "one"),
    # parts on maps of at most SMALL_MAP pixels are mostly reading their weights: their own share of each
    "small_maps": ("small_sum_ms", "parts", "weight_mb"),
    "small_map_weights": ("parts", "weight_mb", "small_weight_mb"),
    # blocks that lead a run (the part before them is another one) their own share: see Features.lead_sum_ms
    "lead_blocks": ("lead_sum_ms", "parts", "weight_mb"),
}
SMALL_MAP = 4  # pixels (2x2): a block there does a few multiply-adds per weight it reads
MIN_EXTRA_MODELS = 3  # a form with k coefficients is tried on at least k + 3 models (leave-one-out fits k + 2) ...
RICH = 4  # ... and one with RICH or more on at least 4k: on a bench's 10 calibration models at 32x32, a
# 4-coefficient form won leave-one-out (2.5%) and then predicted 30 new models to 6.4%, where 3 coefficients did 4.3%


def min_models(form: str) -> int:
    """Whole models needed before ``form="auto"`` may choose ``form`` (see MIN_EXTRA_MODELS and RICH)."""
    k = 1 + len(FORMS[form])
    return 4 * k if k >= RICH else k + MIN_EXTRA_MODELS
TIE = 0.002  # held-out errors this close (0.2 points) are equal
NEAR_BEST = 1.5  # forms whose held-out error is at most this times the best form's (+ TIE) are averaged
MEAN = "mean"  # the form name of such an average


class CalibrationError(MixerNASError, ValueError):
    """Calibration data that cannot be fitted (mismatched, non-positive or too few)."""


@dataclass(frozen=True)
class Features:
    """What a whole model is made of, as the predictor sees it."""

    sum_ms: float  # sum of the parts' table latencies
    parts: int  # stem, blocks, downsampling layers and head
    weight_mb: float  # megabytes of parameters the parts hold (in the measured dtype)
    small_sum_ms: float = 0.0  # the share of sum_ms of parts on maps of at most SMALL_MAP pixels
    small_weight_mb: float = 0.0  # the share of weight_mb of those parts
    # The share of sum_ms of blocks whose predecessor in the model is a different part (the first block of each
    # stage or run). The table times a part in a loop where it follows itself; inside a model, a block that
    # follows a layer of another shape meets colder code, kernels and caches, one that repeats its predecessor
    # less so: fitted on whole models, a leading block costs more than its entry and a repeated one less.
    lead_sum_ms: float = 0.0

    def vector(self, form: str) -> list[float]:
        values = {"one": 1.0, "parts": float(self.parts), "weight_mb": self.weight_mb,
                  "small_sum_ms": self.small_sum_ms, "small_weight_mb": self.small_weight_mb,
                  "lead_sum_ms": self.lead_sum_ms}
        return [self.sum_ms, *(values[name] for name in FORMS[form])]


@dataclass(frozen=True)
class Accuracy:
    """How well predictions matched measurements."""

    mape: float  # mean absolute percentage error (0.03 = 3%)
    within10: float  # share of models predicted within +-10%
    tau: float  # Kendall's tau between predicted and measured order (nan for fewer than two models)
    models: int

    def __str__(self) -> str:
        return (f"mean error {self.mape:.1%}, {self.within10:.0%} within +-10%, Kendall tau {self.tau:.3f} "
                f"over {self.models} models")


@dataclass(frozen=True)
class Calibration:
    """``predicted = coefficients . features(form)``; the identity (plain sum) until fitted on whole models.

    Form :data:`MEAN` has no coefficients of its own: it predicts the mean of its ``members``' predictions.
    """

    form: str = "scale"
    coefficients: tuple[float, ...] = (1.0,)
    models: int = 0  # whole models the fit used
    fit_mape: float | None = None  # error on those models after the fit
    holdout: Accuracy | None = None  # each model predicted by a fit on the others (leave-one-out)
    members: tuple[Calibration, ...] = ()  # form MEAN: the fitted forms it averages

    def apply(self, features: Features) -> float:
        if self.members:
            return math.fsum(m.apply(features) for m in self.members) / len(self.members)
        return math.fsum(c * v for c, v in zip(self.coefficients, features.vector(self.form)))

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms whose predictions this calibration averages (one, unless the form is MEAN)."""
        return tuple(m.form for m in self.members) if self.members else (self.form,)

    @property
    def scale(self) -> float:
        """The coefficient of the sum of parts (the members' mean for MEAN)."""
        if self.members:
            return math.fsum(m.scale for m in self.members) / len(self.members)
        return self.coefficients[0]

    def terms(self) -> str:
        """The fitted expression of a single form, e.g. ``1.1 x sum + 0.05 x parts``."""
        names = ("sum", *FORMS[self.form])
        return " + ".join(f"{c:.4g} x {n}" if n != "one" else f"{c:.4g} ms" for c, n in zip(self.coefficients, names))

    def __str__(self) -> str:
        if not self.models:
            return "uncalibrated (plain sum of parts)"
        held = f"; held out: {self.holdout}" if self.holdout is not None else ""
        what = (f"the mean of {len(self.members)} forms ({', '.join(self.forms)})" if self.members
                else f"form {self.form!r}: {self.terms()}")
        return f"{what}, fitted on {self.models} models (fit error {self.fit_mape:.1%}{held})"

    def to_dict(self) -> dict:
        data = {"form": self.form, "coefficients": list(self.coefficients), "models": self.models,
                "fit_mape": self.fit_mape}
        data["holdout"] = None if self.holdout is None else vars(self.holdout).copy()
        if self.members:
            data["members"] = [m.to_dict() for m in self.members]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        members = tuple(cls.from_dict(m) for m in data.get("members") or ())
        if data["form"] == MEAN:
            if not members or any(m.members for m in members) or data["coefficients"]:
                raise CalibrationError("a 'mean' calibration needs fitted member forms and no coefficients")
        elif data["form"] not in FORMS or len(data["coefficients"]) != 1 + len(FORMS[data["form"]]) or members:
            raise CalibrationError(f"unknown calibration form {data['form']!r}")
        holdout = Accuracy(**data["holdout"]) if data.get("holdout") else None
        return cls(data["form"], tuple(float(c) for c in data["coefficients"]), int(data["models"]),
                   data.get("fit_mape"), holdout, members)


IDENTITY = Calibration()


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two sequences (ties counted as neither concordant nor discordant).

    >>> kendall_tau([1, 2, 3], [10, 20, 30]), kendall_tau([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    n = len(a)
    if n < 2:
        return math.nan
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator else math.nan


def mean_relative_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean of ``|predicted - measured| / measured`` (the MAPE, as a fraction), without the ranking's cost."""
    return sum(abs(p - m) / m for p, m in zip(predicted, measured)) / len(measured)


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> Accuracy:
    """MAPE, share within +-10% and Kendall's tau of ``predicted`` against ``measured``.

    >>> str(accuracy([1.0, 2.2, 2.9], [1.0, 2.0, 3.0]))
    'mean error 4.4%, 100% within +-10%, Kendall tau 1.000 over 3 models'
    """
    if len(predicted) != len(measured) or not measured:
        raise CalibrationError("accuracy needs as many predictions as measurements, at least one")
    rel = [(p - m) / m for p, m in zip(predicted, measured)]
    within = sum(abs(r) <= 0.10 + 1e-9 for r in rel) / len(rel)  # 2.2 against 2.0 is within, float rounding aside
    return Accuracy(mean_relative_error(predicted, measured), within,
                    kendall_tau(list(predicted), list(measured)), len(rel))


def _solve(rows: list[list[float]], measured: list[float]) -> list[float]:
    """Coefficients minimising the squared relative error ``sum(((x . c) - m) / m)^2``."""
    a = np.array([[v / m for v in row] for row, m in zip(rows, measured)], dtype=float)
    coefficients, *_ = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)
    return [float(c) for c in coefficients]


def _fit_form(features: Sequence[Features], measured: list[float], form: str) -> Calibration:
    rows = [f.vector(form) for f in features]
    fit = Calibration(form, tuple(_solve(rows, measured)))
    mape = mean_relative_error([fit.apply(f) for f in features], measured)
    return Calibration(form, fit.coefficients, len(measured), mape)


def holdout_predictions(features: Sequence[Features], measured: Sequence[float],
                        forms: str | Sequence[str]) -> list[float]:
    """Each model predicted by the form (or the mean of the ``forms``) fitted on all the other models
    (leave-one-out)."""
    forms = [forms] if isinstance(forms, str) else list(forms)
    m = [float(v) for v in measured]
    out = []
    for i in range(len(m)):
        others, others_m = features[:i] + features[i + 1:], m[:i] + m[i + 1:]
        out.append(math.fsum(_fit_form(others, others_m, f).apply(features[i]) for f in forms) / len(forms))
    return out


def fit_calibration(features: Sequence[Features], measured_ms: Sequence[float], *, form: str = "auto") -> Calibration:
    """Fit the predictor on whole models measured for real. ``form="auto"`` judges every form the number of models
    allows by its leave-one-out error and averages those within NEAR_BEST of the best (a single form where only
    one qualifies); a form named is fitted alone (see the module docstring).

    >>> feats = [Features(s, 10, 1.0) for s in (10.0, 20.0, 40.0)]
    >>> round(fit_calibration(feats, [11.0, 22.0, 44.0]).scale, 6)
    1.1
    """
    features = list(features)
    m = [float(v) for v in measured_ms]
    if len(features) != len(m) or not m:
        raise CalibrationError(f"calibration needs one measurement per model, got {len(m)} for {len(features)}")
    if any(not (math.isfinite(v) and v > 0) for v in m) or any(not (f.sum_ms > 0) for f in features):
        raise CalibrationError("calibration needs positive, finite part sums and measured latencies")
    if form != "auto" and form not in FORMS:
        raise CalibrationError(f"calibration form must be 'auto' or one of {', '.join(FORMS)}; got {form!r}")
    candidates = list(FORMS) if form == "auto" else [form]
    # asked for by name, a form is judged held out as soon as leave-one-out can fit it; auto is more careful
    usable = [f for f in candidates
              if len(m) >= (min_models(f) if form == "auto" else 1 + len(FORMS[f]) + MIN_EXTRA_MODELS)]
    if not usable:
        fit = _fit_form(features, m, "scale" if form == "auto" else form)
        return fit
    held = {name: holdout_predictions(features, m, name) for name in usable}
    errors = {name: mean_relative_error(predicted, m) for name, predicted in held.items()}
    best = min(errors.values())
    chosen: list[str] = []
    for name in usable:  # simplest first; a form predicting exactly what a simpler one does is the same form
        if errors[name] <= NEAR_BEST * best + TIE and not any(
                np.allclose(held[name], held[other], rtol=1e-9, atol=0.0) for other in chosen):
            chosen.append(name)
    fits = tuple(_fit_form(features, m, name) for name in chosen)
    if len(fits) == 1:
        return Calibration(fits[0].form, fits[0].coefficients, len(m), fits[0].fit_mape, accuracy(held[chosen[0]], m))
    mean = Calibration(MEAN, (), len(m), members=fits)
    fit_mape = mean_relative_error([mean.apply(f) for f in features], m)
    # each model's held-out prediction is the mean of the members' own, every one fitted without that model
    held_mean = [math.fsum(held[name][i] for name in chosen) / len(chosen) for i in range(len(m))]
    return Calibration(MEAN, (), len(m), fit_mape, accuracy(held_mean, m), fits)
