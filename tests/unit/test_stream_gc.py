"""The stream's garbage-collector policy: fewer collections while it runs, restored after."""

from __future__ import annotations

import gc

from engagement_dagster.lib.stream import GC_THRESHOLDS, fewer_collections


def test_the_stream_collects_cycles_less_often_and_gives_the_thresholds_back() -> None:
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what was there before is never walked again
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # cycles are still found
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
