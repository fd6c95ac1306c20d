"""The account's changelog record (format 2: a JSON head and the positions as float64) reads
back exactly as the JSON record of format 1 would, records of format 1 still load, and an
account loaded from either rebuilds the same state."""
import orjson
import pytest

from streams.processor import RiskProcessor, account_from_bytes, account_parts
from tests.pipeline.workload import account_events, market_ready, steady_processor


def _processor_with_history(n_accounts=40):
    proc = steady_processor()
    deposits, trades = account_events(n_accounts)
    events = [(name, rec, topic, k % 3, k) for k, (topic, name, rec) in
              enumerate(deposits + trades)]
    for a in {e[1]["account"] for e in events}:
        proc.partition[a] = hash(a) % 3
    out = proc.apply_account_events(events)
    for e in out.events:  # as the worker does before sending: events wait in the outbox
        proc.outbox.setdefault(e["account"], []).append(e)
    return proc


def _v1(proc, a) -> dict:
    """The format-1 record (all JSON) of the same state: the reference."""
    return orjson.loads(orjson.dumps(proc.account_record(a), option=orjson.OPT_SERIALIZE_NUMPY))


def test_format_2_reads_back_as_the_json_record_bit_for_bit():
    proc = _processor_with_history()
    accts = list(proc.offsets)
    assert any(proc.outbox.get(a) for a in accts)  # outboxes are part of what is checked
    assert max(len(proc.book.position_tuples(a)) for a in accts) >= 2
    for a in accts:
        rec = account_from_bytes(proc.account_record_bytes(a))
        assert rec == _v1(proc, a), a  # floats compared exactly, not rounded


def test_an_account_loads_the_same_from_either_format():
    proc = _processor_with_history()
    for a in list(proc.offsets):
        v2 = proc.account_record_bytes(a)
        v1 = orjson.dumps(proc.account_record(a), option=orjson.OPT_SERIALIZE_NUMPY)
        twins = []
        for value in (v1, v2):
            other = market_ready(RiskProcessor(clock=lambda: 1_800_000_000.0))
            other.load_account(a, account_from_bytes(value))
            twins.append(other.account_record_bytes(a))
        assert twins[0] == twins[1] == v2, a


def test_a_restart_loads_an_account_from_its_parts_as_from_its_record():
    """The restart's bulk path (``account_parts`` and ``load_account_parts``, the positions
    written as one slice) against ``load_account``, from either format: the same book and
    record, byte for byte."""
    proc = _processor_with_history()
    for a in list(proc.offsets):
        v2 = proc.account_record_bytes(a)
        v1 = orjson.dumps(proc.account_record(a), option=orjson.OPT_SERIALIZE_NUMPY)
        for value in (v1, v2):
            ref = market_ready(RiskProcessor(clock=lambda: 1_800_000_000.0))
            ref.load_account(a, account_from_bytes(value))
            got = market_ready(RiskProcessor(clock=lambda: 1_800_000_000.0))
            got.load_account_parts(a, *account_parts(value))
            assert got.account_record_bytes(a) == ref.account_record_bytes(a) == v2, a
            assert got.outbox.get(a) == ref.outbox.get(a), a


def test_a_truncated_record_is_refused():
    proc = _processor_with_history(3)
    a = next(a for a in proc.offsets if proc.book.position_tuples(a))
    with pytest.raises(ValueError, match="account record of"):
        account_from_bytes(proc.account_record_bytes(a)[:-8])
