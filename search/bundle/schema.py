"""The types of ``model.json``'s fields that ``search predict`` reads, checked once at load.

Everything a client needs to prepare inputs is in ``model.json``; a hand-edited or truncated
file must fail as one line naming the field, not as a ``TypeError`` deep inside numpy. The
schema is lenient about everything predict does not read (``extra="allow"``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from search.data.decode import MODALITIES, RESIZE_MODES

Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class _Pixels(_Open):
    scale: Positive
    mean: Finite | list[Finite]
    std: Positive | list[Positive]


class _Rgb(_Pixels):
    @field_validator("mean", "std")
    @classmethod
    def _three(cls, value: float | list[float]) -> float | list[float]:
        if isinstance(value, list) and len(value) != 3:
            raise ValueError("needs one value per channel (3)")
        return value


class _Depth(_Pixels):
    @field_validator("mean", "std")
    @classmethod
    def _one(cls, value: float | list[float]) -> float | list[float]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("needs one value (depth has one channel)")
        return value


class _Numeric(_Open):
    mean: list[Finite]
    std: list[Positive]
    names: list[str] | None = None

    @field_validator("std")
    @classmethod
    def _same_length(cls, value: list[float], info) -> list[float]:
        if len(value) != len(info.data.get("mean", value)):
            raise ValueError("needs as many values as mean")
        return value


class _Text(_Open):
    buckets: Annotated[int, Field(gt=1)]
    length: Annotated[int, Field(gt=0, le=100_000)]


class _Resize(_Open):
    mode: Literal[RESIZE_MODES]  # type: ignore[valid-type]


class _Preprocess(_Open):
    resolution: Annotated[int, Field(gt=0, le=8192)]
    rgb: _Rgb
    depth: _Depth | None = None
    numeric: _Numeric | None = None
    text: _Text | None = None
    resize: _Resize | str | None = None


class _Input(_Open):
    name: str
    modality: Literal[MODALITIES]  # type: ignore[valid-type]
    dtype: Literal["float32", "int64"]  # what export writes (describe_inputs)


class BundleMeta(_Open):
    labels: dict[str, str]
    inputs: Annotated[list[_Input], Field(min_length=1)]
    preprocess: _Preprocess


def first_problem(meta: dict) -> str | None:
    """``"preprocess.rgb.std.1: Input should be greater than 0"``, or None when it fits."""
    try:
        BundleMeta.model_validate(meta)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}"
    return None
