#!/usr/bin/env python3
"""Offline reference stays for learning-api: trackintel on a whole CSV of fixes.

Runs trackintel's sliding staypoint detection (Li et al. 2008) with the thresholds
learning-api uses by default (STAY_RADIUS_M=200, STAY_MIN_DURATION=20m,
MAX_TIME_DIFF=12h as the gap threshold) and clusters the stays into locations
(DBSCAN, epsilon = PLACE_RADIUS_M = 200 m, one sample), then writes one row per stay:

    device_id,started_ms,finished_ms,lat,lon,fixes,location_id

  scripts/reference/stays.py [INPUT.csv [OUTPUT.csv]]

STAY_RADIUS_M in the environment overrides the stay radius (a relearn with a larger radius is
compared with `STAY_RADIUS_M=500`, written to ais-virginia-beach-stays-500m.csv).

INPUT has the columns device_id,timestamp,lon,lat (timestamp ISO-8601 UTC); by
default the AIS sample in data/, and OUTPUT the committed reference beside this
script. The learning crate's `reference` test compares the online stays with it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import pandas as pd
import trackintel as ti

ROOT = Path(__file__).resolve().parents[2]
INPUT = ROOT / "data" / "ais-virginia-beach-2020-06-04..06.csv"
OUTPUT = Path(__file__).resolve().parent / "ais-virginia-beach-stays.csv"

STAY_RADIUS_M = int(os.environ.get("STAY_RADIUS_M", "200"))
STAY_MIN_DURATION_MIN = 20
MAX_TIME_DIFF_MIN = 12 * 60
PLACE_RADIUS_M = 200

EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def millis(times: pd.Series) -> pd.Series:
    return (times - EPOCH) // pd.Timedelta(milliseconds=1)


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else INPUT
    target = Path(argv[2]) if len(argv) > 2 else OUTPUT
    fixes = pd.read_csv(source, dtype={"device_id": str})
    fixes = fixes.rename(columns={"device_id": "user_id", "timestamp": "tracked_at"})
    fixes["tracked_at"] = pd.to_datetime(fixes["tracked_at"], utc=True)
    # learning-api learns one fix per device and time (the first sent): do the same here.
    fixes = fixes.drop_duplicates(subset=["user_id", "tracked_at"], keep="first")
    frame = gpd.GeoDataFrame(
        fixes, geometry=gpd.points_from_xy(fixes["lon"], fixes["lat"]), crs="EPSG:4326"
    )
    pfs = ti.Positionfixes(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pfs, sp = pfs.generate_staypoints(
            method="sliding",
            distance_metric="haversine",
            dist_threshold=STAY_RADIUS_M,
            time_threshold=STAY_MIN_DURATION_MIN,
            gap_threshold=MAX_TIME_DIFF_MIN,
            include_last=False,
        )
        sp, _locations = sp.generate_locations(
            method="dbscan",
            epsilon=PLACE_RADIUS_M,
            num_samples=1,
            distance_metric="haversine",
            agg_level="user",
        )
    counts = pfs.dropna(subset=["staypoint_id"]).groupby("staypoint_id").size()
    out = pd.DataFrame(
        {
            "device_id": sp["user_id"].astype(str),
            "started_ms": millis(sp["started_at"]),
            "finished_ms": millis(sp["finished_at"]),
            "lat": sp.geometry.y.round(7),
            "lon": sp.geometry.x.round(7),
            "fixes": counts.reindex(sp.index).fillna(0).astype(int),
            "location_id": sp["location_id"].astype("Int64"),
        }
    ).sort_values(["device_id", "started_ms"], kind="stable")
    out.to_csv(target, index=False)
    print(
        f"{len(out)} stays of {out['device_id'].nunique()} devices "
        f"(trackintel {ti.__version__}) -> {target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
