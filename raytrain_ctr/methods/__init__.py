"""Method registry: every method and baseline by name."""

from __future__ import annotations

import difflib

from raytrain_ctr.methods.autoft import AutoFT, SpotTune
from raytrain_ctr.methods.base import Input, Method, Stage, StageContext, StageHooks, Window, bce
from raytrain_ctr.methods.baselines import (
    KEEP,
    L2SP,
    LR,
    All,
    DINMethod,
    FineTune,
    ProgressiveNN,
    SourceOnly,
    TargetOnly,
)
from raytrain_ctr.methods.cctl import CCTL
from raytrain_ctr.methods.cdanet import CDAnet
from raytrain_ctr.methods.e_cdctr import ECDCTR
from raytrain_ctr.methods.joint import STAR, CoNet, MMoENet, PLENet, ShareBottom
from raytrain_ctr.methods.mkt import MKT
from raytrain_ctr.spec import SpecError, check_keys

METHODS: dict[str, type[Method]] = {m.name: m for m in (TargetOnly, LR, SourceOnly, All, FineTune, L2SP, ProgressiveNN,
                                                         KEEP, AutoFT, SpotTune, ShareBottom, MMoENet, PLENet, STAR,
                                                         CoNet, CDAnet, CCTL, DINMethod, MKT, ECDCTR)}


def get_method(name: str, args: dict | None = None) -> Method:
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise SpecError(f"unknown method '{name}'{hint} (known: {sorted(METHODS)})")
    cls = METHODS[name]
    args = dict(args or {})
    check_keys(args, set(cls.arg_defaults), f"method_args of '{name}'")
    method = cls(**args)
    if not method.stages:  # resolving the stages also checks the args' values
        raise SpecError(f"method '{name}' with args {args} has no stages")
    return method


__all__ = ["METHODS", "Input", "Method", "Stage", "StageContext", "StageHooks", "Window", "bce", "get_method"]
