"""The fusion registry: fusion name -> model class, and which second modalities it accepts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from models.fusions._base import FusionModel

__all__ = ["fusion_accepts", "get_fusion", "list_fusions", "register_fusion"]

_FusionT = TypeVar("_FusionT", bound="type[FusionModel]")
_FUSIONS: dict[str, type[FusionModel]] = {}


def register_fusion(name: str, *, accepts: Iterable[str | None]) -> Callable[[_FusionT], _FusionT]:
    """Register a fusion model class under ``name``.

    Args:
        name: What a study file and :class:`models.ModelSpec` call the fusion.
        accepts: Second modalities the fusion can use; ``None`` in it means it also works
            on RGB alone.

    Returns:
        A class decorator that records the class and sets its ``name`` and ``accepts``.
    """

    def decorator(cls: _FusionT) -> _FusionT:
        if name in _FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered")
        cls.name = name
        cls.accepts = frozenset(accepts)
        _FUSIONS[name] = cls
        return cls

    return decorator


def list_fusions() -> list[str]:
    """Return the registered fusion names in registration order."""
    return list(_FUSIONS)


def get_fusion(name: str) -> type[FusionModel]:
    """Return the model class registered as ``name``.

    Raises:
        ValueError: No fusion has that name.
    """
    if name not in _FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose from {list_fusions()}")
    return _FUSIONS[name]


def fusion_accepts(name: str) -> set[str | None]:
    """Return the second modalities fusion ``name`` accepts (``None``: RGB alone).

    The search uses this to sample only fusions the data can feed, e.g.
    ``fusion_accepts("early") == {"depth", "numeric"}``.
    """
    return set(get_fusion(name).accepts)
