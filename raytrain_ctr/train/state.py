"""Model state between stages: load with include/exclude filters (by key and by module type), into
a prefix; freeze by pattern, with frozen modules kept in eval mode.

Key patterns are ``fnmatch`` globs over ``state_dict`` keys, e.g. ``embedding.*``,
``backbone.head.*`` (CDAnet re-initialises the tower); module patterns are globs over class
names, e.g. ``*BatchNorm*`` (E-CDCTR's A-CTR re-initialises every BatchNorm).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

FROZEN = "_raytrain_frozen"  # set on modules whose every parameter is frozen: they stay in eval mode


class StateMismatchError(ValueError):
    """A checkpoint does not fit the model built from the spec."""


def matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch(key, p) for p in patterns)


def select(state: dict[str, torch.Tensor], include: tuple[str, ...] = ("*",),
           exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if matches(k, include) and not matches(k, exclude)}


def module_keys(model: nn.Module, types: tuple[str, ...]) -> set[str]:
    """The ``state_dict`` keys of ``model``'s modules whose class name matches ``types``."""
    if not types:
        return set()
    keys = set(model.state_dict())
    out: set[str] = set()
    for name, m in model.named_modules():
        if matches(type(m).__name__, types):
            prefix = f"{name}." if name else ""
            out |= {k for k in keys if k.startswith(prefix)}
    return out


def load_filtered(model: nn.Module, state: dict[str, torch.Tensor], include: tuple[str, ...] = ("*",),
                  exclude: tuple[str, ...] = (), source: str = "checkpoint", strip: str = "", into: str = "",
                  exclude_modules: tuple[str, ...] = ()) -> list[str]:
    """Copy the selected tensors of ``state`` into ``model``; returns the model keys loaded.

    A selected key loses the prefix ``strip`` (keys without it are skipped) and gains ``into``;
    keys of modules whose class matches ``exclude_modules`` are not loaded. Raises
    :class:`StateMismatchError` naming the tensor when a selected tensor has another shape
    than the model's (e.g. a table sized for another spec), or when the selection matches
    nothing the model has.
    """
    own = model.state_dict()
    chosen = {into + k[len(strip):]: v for k, v in select(state, include, exclude).items() if k.startswith(strip)}
    kept = module_keys(model, exclude_modules)
    loaded = []
    for key, value in chosen.items():
        if key not in own or key in kept:
            continue
        if own[key].shape != value.shape:
            raise StateMismatchError(
                f"{source}: '{key}' has shape {tuple(value.shape)} but the model built from the spec has "
                f"{tuple(own[key].shape)} (was the upstream stage trained on another spec or embedding_dim?)")
        loaded.append(key)
    if chosen and not loaded and not kept:
        raise StateMismatchError(f"{source}: none of its {len(chosen)} selected tensors exist in this model")
    model.load_state_dict({k: chosen[k] for k in loaded}, strict=False)
    return loaded


def local_name(name: str) -> str:
    """A parameter's name as the ``local`` embedding backend spells it (``embedding.tables.{t}.weight``),
    so that patterns serve both backends."""
    return name.replace(".ebc.embedding_bags.", ".tables.")


def freeze(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match; returns their names. Modules
    whose every parameter is then frozen are marked and kept in eval mode by :func:`train_mode`
    (no dropout, BatchNorm statistics untouched)."""
    frozen = []
    for name, p in model.named_parameters():
        if matches(name, patterns) or matches(local_name(name), patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise StateMismatchError(f"freeze patterns {list(patterns)} match no parameter of the model")
    for m in model.modules() if frozen else ():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            setattr(m, FROZEN, True)
    return frozen


def train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, frozen modules left in eval mode."""
    model.train(mode)
    if mode:
        for m in model.modules():
            if getattr(m, FROZEN, False):
                m.eval()
    return model
