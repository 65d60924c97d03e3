"""Time windows relative to a run's ``as_of`` date (E-CDCTR's monthly, weekly and daily data)."""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from typing import Any

from raytrain_ctr.spec import SpecError

UNITS = ("day", "week", "month")


def add_months(day: dt.date, n: int) -> dt.date:
    y, m = divmod(day.month - 1 + n, 12)
    year, month = day.year + y, m + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


@dataclass(frozen=True)
class Window:
    """The rows with ``as_of + start·unit <= time < as_of + stop·unit`` (``unit``: day, week or
    calendar month; midnight UTC). ``Window(-1)`` is the month before ``as_of``,
    ``Window(-6, -1)`` the five months before that."""

    start: int
    stop: int = 0
    unit: str = "month"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise SpecError(f"window unit '{self.unit}' is not one of {list(UNITS)}")
        if self.stop <= self.start:
            raise SpecError(f"window [{self.start}, {self.stop}) {self.unit}s is empty")

    def shift(self, day: dt.date, n: int) -> dt.date:
        if self.unit == "month":
            return add_months(day, n)
        return day + dt.timedelta(days=n * (7 if self.unit == "week" else 1))

    def dates(self, as_of: dt.date) -> tuple[dt.date, dt.date]:
        return self.shift(as_of, self.start), self.shift(as_of, self.stop)

    def bounds(self, as_of: dt.date) -> tuple[int, int]:
        """``[start, end)`` in unix seconds."""
        return tuple(int(dt.datetime.combine(d, dt.time(), dt.timezone.utc).timestamp())  # type: ignore[return-value]
                     for d in self.dates(as_of))

    @classmethod
    def parse(cls, raw: Any, where: str) -> Window:
        """From ``[start, stop]`` or ``[start, stop, unit]`` (config files); errors name ``where``."""
        if isinstance(raw, Window):
            return raw
        if not isinstance(raw, (list, tuple)) or len(raw) not in (2, 3) or not all(isinstance(v, int) for v in raw[:2]):
            raise SpecError(f"{where}: a window is [start, stop] or [start, stop, unit] (integers relative to "
                            f"as_of; unit one of {list(UNITS)}), got {raw!r}")
        try:
            return cls(*raw)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    def as_list(self) -> list:
        return [self.start, self.stop, self.unit]
