"""Write the checked-in sample click log: two domains (video, game) of a made-up app, positives only.

Synthetic, not a public log (public ones may not be redistributed here): 400 users with a taste over 6
categories shared by both domains, clicking items of the categories they like, video about 7× the size of game.
Each row is one click: ``user_id,item_id,category,hour,ts`` (ts: unix seconds over 60 days). The file
is written once and committed (``python examples/clicklog/make_sample.py``); the README's "Bring your own
data" walks it to a leaderboard.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

USERS, CATEGORIES = 400, 6
DOMAINS = {"video": (120, 8000), "game": (60, 1200)}  # items, clicks
START = 1_767_225_600  # 2026-01-01


def clicks(rng: np.random.Generator, taste: np.ndarray, items: int, n: int, id_base: int) -> list[tuple]:
    category = rng.integers(0, CATEGORIES, items)
    popularity = rng.pareto(1.5, items) + 1
    users = rng.integers(0, USERS, n)
    rows = []
    for u in users:
        w = popularity * np.exp(3.0 * taste[u, category])
        i = rng.choice(items, p=w / w.sum())
        rows.append((int(u) + 1, id_base + int(i), f"c{category[i]}", int(rng.integers(0, 24)),
                     START + int(rng.integers(0, 60 * 86_400))))
    return sorted(rows, key=lambda r: r[4])


def main(out: Path = Path(__file__).parent) -> None:
    rng = np.random.default_rng(7)
    taste = rng.normal(size=(USERS, CATEGORIES))
    base = 1000
    for name, (items, n) in DOMAINS.items():
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "category", "hour", "ts"])
            w.writerows(clicks(rng, taste, items, n, base))
        base += 1000


if __name__ == "__main__":
    main()
