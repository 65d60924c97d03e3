"""Model state between stages: load with include/exclude filters, freeze by pattern.

Patterns are ``fnmatch`` globs over ``state_dict`` keys, e.g. ``embedding.*``,
``*.bn.*`` / ``*BatchNorm*`` (E-CDCTR drops BatchNorm), ``backbone.head.*`` (CDAnet
re-initialises the tower).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn


class StateMismatchError(ValueError):
    """A checkpoint does not fit the model built from the spec."""


def matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch(key, p) for p in patterns)


def select(state: dict[str, torch.Tensor], include: tuple[str, ...] = ("*",),
           exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if matches(k, include) and not matches(k, exclude)}


def load_filtered(model: nn.Module, state: dict[str, torch.Tensor], include: tuple[str, ...] = ("*",),
                  exclude: tuple[str, ...] = (), source: str = "checkpoint") -> list[str]:
    """Copy the selected tensors of ``state`` into ``model``; returns the keys loaded.

    Raises :class:`StateMismatchError` naming the tensor when a selected tensor has
    another shape than the model's (e.g. a table sized for another spec), or when the
    selection matches nothing the model has.
    """
    own = model.state_dict()
    chosen = select(state, include, exclude)
    loaded = []
    for key, value in chosen.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            raise StateMismatchError(
                f"{source}: '{key}' has shape {tuple(value.shape)} but the model built from the spec has "
                f"{tuple(own[key].shape)} (was the upstream stage trained on another spec or embedding_dim?)")
        loaded.append(key)
    if chosen and not loaded:
        raise StateMismatchError(f"{source}: none of its {len(chosen)} selected tensors exist in this model")
    model.load_state_dict({k: chosen[k] for k in loaded}, strict=False)
    return loaded


def local_name(name: str) -> str:
    """A parameter's name as the ``local`` embedding backend spells it (``embedding.tables.{t}.weight``),
    so that patterns serve both backends."""
    return name.replace(".ebc.embedding_bags.", ".tables.")


def freeze(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match; returns their names."""
    frozen = []
    for name, p in model.named_parameters():
        if matches(name, patterns) or matches(local_name(name), patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise StateMismatchError(f"freeze patterns {list(patterns)} match no parameter of the model")
    return frozen
