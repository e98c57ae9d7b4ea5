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


def test_two_streams_in_one_process_give_the_thresholds_back_once_both_end() -> None:
    before = gc.get_threshold()
    first, second = fewer_collections(), fewer_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == GC_THRESHOLDS  # the second still streams
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
