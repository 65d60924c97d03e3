"""Cadenced jobs (E-CDCTR §3.6.1): each job of a method runs on its own schedule, on its own date.

A job is a stage, or the stages ``NAME.*`` (:meth:`Method.job`); its first stage's ``every`` says when
it is due: ``day`` every day, ``week`` on Mondays, ``month`` on the 1st. :func:`simulate` runs the
jobs day by day over a span (every job on the first day, a cold start), each as
``run --stage JOB --as-of DAY``: it reads the latest upstream artifact valid on that day from the
catalog, skips what exists, and prunes what its ``keep_last`` lets go. The result is the timeline:
which artifact each job made (or found), and which upstream artifacts it read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raytrain_ctr import pipeline
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.methods import Method, get_method
from raytrain_ctr.spec import SpecError


def due(every: str, day: dt.date) -> bool:
    return every == "day" or (every == "week" and day.weekday() == 0) or (every == "month" and day.day == 1)


def jobs(method: Method) -> list[tuple[str, str]]:
    """``(job, every)`` in stage order; every stage must declare its cadence."""
    out: dict[str, str] = {}
    for s in method.stages:
        if s.every is None:
            raise SpecError(f"stage '{s.name}' of '{method.name}' declares no cadence (Stage.every)")
        out.setdefault(s.job, s.every)
    return list(out.items())


@dataclass
class Event:
    """One job run on one day."""

    day: str
    job: str
    trained: list[str]  # its stages that trained (the others' artifacts existed)
    artifacts: dict[str, str]  # stage -> artifact name
    reads: dict[str, str] = field(default_factory=dict)  # the job's last stage's inputs -> upstream artifact
    metrics: dict[str, float] = field(default_factory=dict)  # the last stage's test metrics


def simulate(cfg: ExperimentConfig, start: dt.date, days: int,
             on_event: Callable[[Event], None] | None = None) -> list[Event]:
    """Run ``cfg.method``'s jobs over ``days`` days from ``start`` (Ray must be running)."""
    method = get_method(cfg.method, cfg.method_args)
    events = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        for job, every in jobs(method):
            if i and not due(every, day):
                continue
            results = pipeline.run(cfg.with_overrides({"as_of": day.isoformat()}), stage=job)
            last = results[list(results)[-1]]
            event = Event(day.isoformat(), job, [s for s, r in results.items() if not r.get("skipped")],
                          {s: Path(r["artifact"]).name for s, r in results.items()},
                          {k: Path(v).name for k, v in last["inputs"].items() if v},
                          {k: last[k] for k in ("test_auc", "test_gauc") if k in last})
            events.append(event)
            if on_event:
                on_event(event)
    return events


def labels(events: list[Event]) -> dict[str, str]:
    """Artifact name -> ``JOB@DAY`` of the run that made it."""
    out: dict[str, str] = {}
    for e in events:
        for art in e.artifacts.values():
            out.setdefault(art, f"{art.split('-')[0]}@{e.day}")
    return out


def line(e: Event, names: dict[str, str]) -> str:
    made = ", ".join(names.get(a, a) for s, a in e.artifacts.items() if s in e.trained) or "nothing (artifacts exist)"
    reads = " ".join(f"{k}={names.get(v, v)}" for k, v in e.reads.items())
    scores = " ".join(f"{k} {v:.4f}" for k, v in e.metrics.items())
    return f"{e.day} {e.job:5s} trained {made}" + (f" | reads {reads}" if reads else "") + (
        f" | {scores}" if scores else "")


def write(events: list[Event], out: str) -> Path:
    """``timeline.json`` and ``timeline.md`` (one line per job run) under ``out``."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "timeline.json").write_text(json.dumps([asdict(e) for e in events], indent=2))
    names = labels(events)
    (path / "timeline.md").write_text("\n".join(["```", *(line(e, names) for e in events), "```", ""]))
    return path
