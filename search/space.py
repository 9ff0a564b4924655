"""The searchable hyperparameters, declared once in :data:`HYPERPARAMETERS`.

Each row of the table names a hyperparameter, its type, the value a trial trains with when
it is not drawn, what ``[space]`` searches when the study file leaves it out, its allowed
values or bounds, and when it is drawn at all. Everything else derives from the table: the
``[space]`` schema and its validation (:class:`SearchSpace`), the check of ``[sampler]
start_with`` points, sampling (:func:`sample_params`), ``TrialParams``' fields (a test
checks them) and the README's list of ``[space]`` keys (:func:`readme_space_keys`).

Each ``[space]`` entry is one of:

* a list of names or numbers -> categorical (``backbone = ["b0", "b1"]``);
* a list of exactly two numbers -> a range (``dropout = [0.0, 0.5]``); write
  ``{ choices = [16, 32] }`` for a two-value categorical;
* a table ``{ low, high, log = false, step = ... }`` -> a range;
* a single value -> fixed, not searched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, create_model, field_validator

if TYPE_CHECKING:  # the study-file schema must not import Optuna
    import optuna

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
# models/_spec.py validates late rules too (models may not import search); a test checks they agree.
LATE_RULES = ("mean", "learned", "confidence")
TTA_MODES = ("none", "flips")  # search/trial/tta.py
CROPS = ("none", "random_resized")  # search/data/prepared.py, augment/crop.py


@dataclass(frozen=True)
class Categorical:
    """A choice among listed values."""

    choices: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if len(self.choices) == 1:
            return self.choices[0]
        return trial.suggest_categorical(name, list(self.choices))

    def values(self) -> tuple[Any, ...]:
        return self.choices

    def describe_miss(self, value: Any) -> str | None:
        """Why ``value`` cannot be drawn from this parameter, or None if it can."""
        if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices):
            return None
        return f"{value!r} is not one of {list(self.choices)}"


@dataclass(frozen=True)
class Range:
    """A numeric interval; ints give ``suggest_int``, floats ``suggest_float``."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @property
    def is_integer(self) -> bool:
        """Whole-number bounds and step: Optuna's ``suggest_int``."""
        return (isinstance(self.low, int) and isinstance(self.high, int)
                and not isinstance(self.step, float))

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.is_integer:  # then low, high and step are ints; int() only tells mypy so
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def values(self) -> tuple[Any, ...]:
        return (self.low, self.high)

    def centre(self) -> Any:
        """The middle of the range (geometric for log ranges), on its step, rounded for ints."""
        middle = (math.sqrt(self.low * self.high) if self.log
                  else (self.low + self.high) / 2)
        if self.step:
            middle = self.low + round((middle - self.low) / self.step) * self.step
        return round(middle) if self.is_integer else float(middle)

    def describe_miss(self, value: Any) -> str | None:
        """Why ``value`` cannot be drawn from this range, or None if it can."""
        if not _is_number(value):
            return f"{value!r} is not a number"
        if self.is_integer and not isinstance(value, int):
            return f"{value!r} is not an integer (the range is [{self.low}, {self.high}])"
        if not self.low <= value <= self.high:
            return f"{value!r} is outside the range [{self.low}, {self.high}]"
        if self.step and abs(round((value - self.low) / self.step) * self.step
                             - (value - self.low)) > 1e-9:
            return f"{value!r} is not on the range's step {self.step} from {self.low}"
        return None


Param = Categorical | Range


def parse_param(value: Any) -> Param:
    """Turn one ``[space]`` entry into a :class:`Categorical` or :class:`Range`."""
    if isinstance(value, dict):
        if set(value) == {"choices"}:
            return _categorical(value["choices"])
        unknown = set(value) - {"low", "high", "log", "step"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}; use low, high, log, step")
        if "low" not in value or "high" not in value:
            raise ValueError("a range needs both low and high")
        return _range(value["low"], value["high"], value.get("log", False), value.get("step"))
    if isinstance(value, list):
        if len(value) == 2 and all(_is_number(v) for v in value):
            return _range(value[0], value[1], False, None)
        return _categorical(value)
    return _categorical([value])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _categorical(choices: Any) -> Categorical:
    if not isinstance(choices, list) or not choices:
        raise ValueError("choices must be a non-empty list")
    if len(set(map(repr, choices))) != len(choices):
        raise ValueError(f"choices repeat a value ({choices})")
    return Categorical(tuple(choices))


def _range(low: Any, high: Any, log: Any, step: Any) -> Range:
    if not (_is_number(low) and _is_number(high)):
        raise ValueError(f"low and high must be numbers (got {low!r}, {high!r})")
    if not isinstance(log, bool):
        raise ValueError(f"log must be true or false (got {log!r})")
    if low >= high:
        raise ValueError(f"low must be < high (got low={low}, high={high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")
    if step is not None and (not _is_number(step) or step <= 0 or log):
        raise ValueError(f"step must be a positive number and not combined with log (got {step!r})")
    return Range(low, high, log, step)



def _backbones() -> Sequence[str]:
    import models  # imported when a study file is validated, not with the schema

    return models.list_backbones()


def _fusions() -> Sequence[str]:
    import models

    return models.list_fusions()


def _strategies() -> Sequence[str]:
    import augment

    return augment.list_strategies()


@dataclass(frozen=True)
class Hyperparameter:
    """One searchable hyperparameter: the one place it is declared.

    Attributes:
        name: The ``[space]`` key, the Optuna parameter name and the ``TrialParams`` field.
        type: ``str``, ``float`` or ``int``.
        default: What a trial trains with when the parameter is not drawn (see ``when``).
        space: What ``[space]`` searches when the study file leaves the key out; ``None``
            takes ``fallback`` from the rest of the study file instead.
        choices: The allowed names (categorical parameters only), or a function giving them.
        bounds: ``(low, high)`` every value must lie in (numeric parameters).
        strict_low: Values must be strictly above ``low``.
        when: Drawn only if this holds for the values drawn before it and the data's second
            modality; otherwise the trial takes ``default`` (and Optuna records nothing).
        fallback: The value when ``space`` is None and the study file does not set the key.
        doc: One line for the README's list of ``[space]`` keys.
    """

    name: str
    type: type
    default: Any
    space: Param | None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    bounds: tuple[float, float] | None = None
    strict_low: bool = False
    when: Callable[[dict[str, Any], str | None], bool] | None = None
    fallback: Callable[[Any], Any] | None = None
    doc: str = ""

    def allowed(self) -> tuple[Any, ...] | None:
        choices = self.choices() if callable(self.choices) else self.choices
        return None if choices is None else tuple(choices)

    def check(self, value: Param) -> Param:
        """Validate a parsed ``[space]`` entry against the allowed values or bounds."""
        allowed = self.allowed()
        if allowed is not None:
            return _only_names(value, allowed)
        if self.bounds is not None:
            _check_numbers(value, *self.bounds, strict_low=self.strict_low,
                           integer=self.type is int)
        return value


def _two_branches(drawn: dict[str, Any], second: str | None) -> bool:
    return drawn["fusion"] in ("joint", "late") and second == "depth"


# The order is the order Optuna is asked in: keep it, or seeded studies draw differently.
HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("fusion", str, "none", Categorical(("none",)), choices=_fusions,
                   doc='fusion = ["none", "early", "joint", "late"]'),
    Hyperparameter("backbone", str, "b0", Categorical(("b0",)), choices=_backbones,
                   doc='backbone = ["b0", "b1", "b2"]'),
    Hyperparameter("dropout", float, 0.0, Range(0.0, 0.5), bounds=(0.0, 0.95),
                   doc="dropout = [0.0, 0.4]"),
    Hyperparameter("optimizer", str, "adamw", Categorical(("adamw",)), choices=OPTIMIZERS,
                   doc='optimizer = ["adam", "adamw", "sgd", "rmsprop"]'),
    Hyperparameter("lr", float, 1e-3, Range(1e-4, 1e-2, log=True), bounds=(0.0, 10.0),
                   strict_low=True, doc="lr = { low = 1e-3, high = 1e-2, log = true }"),
    Hyperparameter("weight_decay", float, 0.0, Categorical((0.0,)), bounds=(0.0, 1.0),
                   doc="weight_decay"),
    Hyperparameter("batch_size", int, 32, None, bounds=(1, 65536),
                   fallback=lambda config: config.train.batch_size,
                   doc="batch_size = { choices = [16, 32] } (default: [train] batch_size)"),
    Hyperparameter("label_smoothing", float, 0.0, Categorical((0.0,)), bounds=(0.0, 0.5),
                   doc="label_smoothing"),
    Hyperparameter("balance", str, "oversample", Categorical(("oversample",)),
                   choices=_strategies,
                   doc='balance = ["class_weights", "oversample"] (or "none")'),
    Hyperparameter("depth_backbone", str, "b0", Categorical(("b0",)), choices=_backbones,
                   when=_two_branches, doc="depth_backbone (joint/late with depth)"),
    Hyperparameter("late_rule", str, "mean", Categorical(LATE_RULES), choices=LATE_RULES,
                   when=lambda drawn, second: drawn["fusion"] == "late",
                   doc='late_rule ("mean", "learned", "confidence")'),
    # Fine-tuning (search/trial/train.py): the first freeze_epochs train only the heads and
    # fusion layers, the backbones' weights and batch-norm statistics held; then the backbones
    # train at lr x backbone_lr_scale. Last in the table, so studies seeded before they
    # existed still draw the same values for everything else.
    Hyperparameter("freeze_epochs", int, 0, Categorical((0,)), bounds=(0, 1000),
                   doc="freeze_epochs = [0, 3] (head-only epochs first)"),
    Hyperparameter("backbone_lr_scale", float, 1.0, Categorical((1.0,)), bounds=(0.0, 10.0),
                   strict_low=True,
                   doc="backbone_lr_scale = [0.1, 1.0] (backbone lr / head lr)"),
    # An exponential moving average of the weights (search/trial/train.py) is what gets
    # validated, kept and exported; 0 keeps the raw weights.
    Hyperparameter("ema_decay", float, 0.0, Categorical((0.0,)), bounds=(0.0, 0.9999),
                   doc="ema_decay = [0.0, 0.999] (average of the weights; 0: off)"),
    # Test-time augmentation (search/trial/tta.py): validate and export the mean over the
    # study's own per-batch ops ("none": the image as it is).
    Hyperparameter("tta", str, "none", Categorical(("none",)), choices=TTA_MODES,
                   doc='tta = ["none", "flips"] (average over the study\'s own flips)'),
    # Scale augmentation (augment/crop.py): each training sample, every batch, is cut to a
    # random box of its image (cached with a margin) and resized to the resolution. Val,
    # test and export see the same pixels either way, so trials with and without it are
    # compared on the same validation set.
    Hyperparameter("crop", str, "none", Categorical(("none",)), choices=CROPS,
                   doc='crop = ["none", "random_resized"] (random-resized crop per batch)'),
)
BY_NAME = {h.name: h for h in HYPERPARAMETERS}


class _SpaceBase(BaseModel):
    """The parameters a trial samples. Unset entries search the table's ``space`` default."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Param | None:
        if value is None or isinstance(value, Categorical | Range):
            return value
        return parse_param(value)

    @field_validator("*")
    @classmethod
    def _allowed(cls, value: Param | None, info: Any) -> Param | None:
        return None if value is None else BY_NAME[info.field_name].check(value)

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Param: ...

    def get(self, name: str) -> Param | None:
        """The entry for ``name`` (None: not searched, the study file's fallback applies)."""
        return getattr(self, name)

    def check_fits(self, second_modality: str | None) -> None:
        """Refuse a fusion the data's modalities cannot use (it would never train)."""
        import models

        for fusion in self.fusion.values():
            if fusion == "none":  # the rgb-only baseline fits any data
                continue
            accepted = models.fusion_accepts(fusion)
            if second_modality is None and fusion != "none":
                raise ValueError(
                    f"space.fusion: {fusion!r} needs a second modality but data.modalities "
                    "is ['rgb']; use fusion = [\"none\"] or add depth, numeric or text"
                )
            if second_modality is not None and second_modality not in accepted:
                raise ValueError(
                    f"space.fusion: {fusion!r} cannot use modality {second_modality!r} "
                    f"(it accepts {sorted(m for m in accepted if m is not None)})"
                )


# Typed Any: pydantic's create_model overloads cannot see that (type, default) pairs fit.
_FIELDS: dict[str, Any] = {h.name: (Param | None, h.space) for h in HYPERPARAMETERS}
_SpaceFields: Any = create_model("_SpaceFields", __base__=_SpaceBase, **_FIELDS)


class SearchSpace(_SpaceFields):
    """The ``[space]`` table: one optional field per row of :data:`HYPERPARAMETERS`."""


def sample_params(trial: optuna.Trial, config: Any) -> dict[str, Any]:
    """Draw one trial's hyperparameters from ``config.space``, in the table's order.

    Returns every row's value by name, for ``TrialParams(**values)``.
    """
    second = config.data.second_modality
    drawn: dict[str, Any] = {}
    for hp in HYPERPARAMETERS:
        param = config.space.get(hp.name)
        if hp.when is not None and not hp.when(drawn, second):
            drawn[hp.name] = hp.default
        elif param is None:
            drawn[hp.name] = hp.fallback(config) if hp.fallback else hp.default
        else:
            drawn[hp.name] = param.suggest(trial, hp.name)
    return drawn


def readme_space_keys() -> str:
    """The README's list of the optional ``[space]`` keys (tests/search/test_space.py)."""
    shown = ("backbone", "fusion", "dropout", "optimizer", "lr")
    return "# optional: " + ", ".join(h.doc for h in HYPERPARAMETERS if h.name not in shown)


def _only_names(value: Param, allowed: Any) -> Param:
    allowed = tuple(allowed)
    if not isinstance(value, Categorical):
        raise ValueError(f"must be a list of names from {list(allowed)}")
    unknown = [v for v in value.choices if v not in allowed]
    if unknown:
        raise ValueError(f"unknown value {unknown[0]!r}; choose from {list(allowed)}")
    return value


def _check_numbers(
    value: Param, low: float, high: float, *, strict_low: bool, integer: bool = False
) -> None:
    for number in value.values():
        if not _is_number(number) or (integer and not isinstance(number, int)):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"every value must be {kind} (got {number!r})")
        too_low = number <= low if strict_low else number < low
        if too_low or number > high:
            sign = ">" if strict_low else ">="
            raise ValueError(f"must be {sign} {low} and <= {high} (got {number})")
