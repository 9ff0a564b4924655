"""The ``[space]`` table: what Optuna samples, and how one trial's parameters are drawn.

Each entry is one of:

* a list of names or numbers -> categorical (``backbone = ["b0", "b1"]``);
* a list of exactly two numbers -> a range (``dropout = [0.0, 0.5]``); write
  ``{ choices = [16, 32] }`` for a two-value categorical;
* a table ``{ low, high, log = false, step = ... }`` -> a range;
* a single value -> fixed, not searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import BaseModel, ConfigDict, field_validator

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LATE_RULES = ("mean", "learned", "confidence")


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
        if self.is_integer:
            return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step or 1)
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


class SearchSpace(BaseModel):
    """The parameters a trial samples. Unset optional entries take the fixed default."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    backbone: Param = Categorical(("b0",))
    fusion: Param = Categorical(("none",))
    dropout: Param = Range(0.0, 0.5)
    optimizer: Param = Categorical(("adamw",))
    lr: Param = Range(1e-4, 1e-2, log=True)
    weight_decay: Param = Categorical((0.0,))
    batch_size: Param | None = None
    label_smoothing: Param = Categorical((0.0,))
    depth_backbone: Param = Categorical(("b0",))
    late_rule: Param = Categorical(LATE_RULES)

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Param | None:
        if value is None or isinstance(value, Categorical | Range):
            return value
        return parse_param(value)

    @field_validator("backbone", "depth_backbone")
    @classmethod
    def _known_backbones(cls, value: Param) -> Param:
        import models

        return _only_names(value, models.list_backbones())

    @field_validator("fusion")
    @classmethod
    def _known_fusions(cls, value: Param) -> Param:
        import models

        return _only_names(value, models.list_fusions())

    @field_validator("optimizer")
    @classmethod
    def _known_optimizers(cls, value: Param) -> Param:
        return _only_names(value, OPTIMIZERS)

    @field_validator("late_rule")
    @classmethod
    def _known_rules(cls, value: Param) -> Param:
        return _only_names(value, LATE_RULES)

    @field_validator("lr", "dropout", "weight_decay", "label_smoothing")
    @classmethod
    def _in_bounds(cls, value: Param, info: Any) -> Param:
        bounds = {"lr": (0.0, 10.0), "dropout": (0.0, 0.95), "weight_decay": (0.0, 1.0),
                  "label_smoothing": (0.0, 0.5)}[info.field_name]
        _check_numbers(value, *bounds, strict_low=info.field_name == "lr")
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: Param | None) -> Param | None:
        if value is not None:
            _check_numbers(value, 1, 65536, strict_low=False, integer=True)
        return value

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
                    f"(it accepts {sorted(accepted)})"
                )


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
