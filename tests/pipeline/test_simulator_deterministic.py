"""The simulator is deterministic for a seed and builds books that start mostly healthy."""
from datetime import datetime, timezone

from streams.simulator import Market, build_accounts, build_instruments

START = datetime(2026, 11, 22, tzinfo=timezone.utc)


def _run(seed):
    ins = build_instruments(START)
    return build_accounts(300, ins, Market(ins, START, seed), seed, START)


def test_same_seed_same_records():
    assert _run(3) == _run(3)
    assert _run(3) != _run(4)


def test_books_cover_linear_and_inverse_and_collateral_assets():
    deposits, trades = _run(5)
    assets = {d[1] for d in deposits}
    assert {"USD", "BTC", "ETH"} <= assets
    insts = {t[1] for t in trades}
    assert any(i.endswith("-INV") for i in insts) and any(i.endswith("PERPETUAL") for i in insts)
    assert any(i.endswith("-C") for i in insts) and any(i.endswith("-P") for i in insts)
