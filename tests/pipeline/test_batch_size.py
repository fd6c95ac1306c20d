"""Margin events and account records do not depend on the micro-batch size
(``RISKPIPE_BATCH_MAX``): a worker draining a backlog takes large batches, a live one small
ones, and a restart may cut the same input differently; liquidation bots must see the same
events, ids and contents included, whichever way it was cut."""
import pytest

from tests.pipeline.workload import account_events, steady_processor


def _run(events, size):
    proc = steady_processor()
    margin_events = []
    for lo in range(0, len(events), size):
        margin_events += proc.apply_account_events(events[lo:lo + size]).events
    return margin_events, {a: proc.account_record_bytes(a) for a in proc.offsets}


def _by_account(events) -> dict:
    """Each account's events in emitted order (accounts interleave differently per size)."""
    out: dict = {}
    for e in events:
        out.setdefault(e["account"], []).append(e)
    return out


@pytest.mark.parametrize("size", [7, 64, 2000, 8000])
def test_events_and_records_equal_one_event_at_a_time(size):
    deposits, trades = account_events(300)
    events = [(name, rec, topic, 0, k) for k, (topic, name, rec) in
              enumerate(deposits + trades)]
    assert len(events) > 2000  # the larger sizes cut the input differently from each other
    ref_events, ref_records = _run(events, 1)
    assert len({e["account"] for e in ref_events}) > 50  # transitions to compare
    got_events, got_records = _run(events, size)
    assert _by_account(got_events) == _by_account(ref_events)  # each account's in its order
    assert got_records == ref_records
