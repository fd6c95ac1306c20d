"""Fills applied in batches (the compiled path) against the same fills one by one through
``apply_trade``: the same book, bit for bit (positions in their slot order, region sizes,
versions), and the same rejections with the same messages."""
import math

import numpy as np
import pytest

import engine as E
from tests.engine.conftest import make_universe


def _fills(rng, n, accts, ids):
    """Random fills, with opens, adds, partial and exact closes, flips, fees and rebates, new
    accounts, and some bad ones (unknown instrument, NaN, zero, absurd sizes and prices)."""
    out = []
    for _ in range(n):
        a = accts[int(rng.integers(len(accts)))]
        inst = ids[int(rng.integers(len(ids)))]
        q = float(rng.choice([-3.0, -1.0, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0]))
        price = float(rng.choice([0.013, 0.05, 95.5, 100.0, 2_950.0, 60_123.25]))
        fee = float(rng.choice([0.0, 0.0, 0.1, -0.02, 1.5]))
        bad = rng.random()
        if bad < 0.01:
            inst = "NOPE"
        elif bad < 0.02:
            q = math.nan
        elif bad < 0.03:
            q = 0.0
        elif bad < 0.035:
            q = 2e9
        elif bad < 0.04:
            price = -1.0
        elif bad < 0.045:
            fee = math.inf
        elif bad < 0.05:
            q = 9e8  # within the limit, but the balance it moves is not
        out.append((a, inst, q, price, fee))
    return out


def _state(book):
    """Everything but where each region sits: a fill left to the slow path may move its row
    after a later fill moved another one (the margin kernel reads each row's slots in order,
    wherever they are)."""
    n = len(book.ids)
    start, capa = book._start[:n], book._capa[:n]
    order = np.argsort(start)
    assert (start[order][1:] >= (start + capa)[order][:-1]).all()  # regions never overlap
    assert (start + capa).max() <= book._tail
    return (list(book.ids), book._tail, capa.tolist(), book.count[:n].tolist(),
            book.version[:n].tolist(),
            [[(i, q.hex(), c.hex()) for i, q, c in book.position_tuples(a)] for a in book.ids])


@pytest.mark.parametrize("capacity,seed", [(1, 1), (2, 2), (8, 3), (8, 4)])
def test_batches_build_the_same_book_as_one_by_one(capacity, seed):
    uni = make_universe()
    rng = np.random.default_rng(seed)
    ids = [i.id for i in uni.instruments]  # spot balances too: BTC spot is traded as well
    accts = [f"a{k}" for k in range(60)]
    fills = _fills(rng, 6000, accts, ids)
    one, many = E.AccountBook(uni, capacity=capacity), E.AccountBook(uni, capacity=capacity)
    for a in accts[:40]:  # most accounts exist before their first fill, some are new
        for b in (one, many):
            b.apply_collateral(a, "USD", 100_000.0)
    expected = {}
    for k, f in enumerate(fills):
        try:
            one.apply_trade(*f)
        except E.EngineError as err:
            expected[k] = (type(err), str(err))
    got = {}
    lo = 0
    while lo < len(fills):  # batches of random size, accounts repeating within a batch
        size = int(rng.integers(1, 400))
        for k, err in many.apply_trades(fills[lo:lo + size]):
            got[lo + k] = (type(err), str(err))
        lo += size
    assert got == expected
    assert len(expected) > 100  # the bad fills were there, and were rejected
    assert _state(many) == _state(one)
    assert many.count.max() > capacity  # rows outgrew their regions along the way


def _through_the_slow_path(single: str, batch: str, items):
    """``items`` applied one by one (method ``single``) to one book and as a batch (method
    ``batch``) to another, both holding the account "old"; returns the two books and what the
    batch left to its book's ``single``, in call order."""
    uni = make_universe()
    one, many = E.AccountBook(uni), E.AccountBook(uni)
    for b in (one, many):
        b.apply_collateral("old", "USD", 1_000.0)
    for x in items:
        getattr(one, single)(*x)
    slow = []
    by_one = getattr(many, single)
    setattr(many, single, lambda *x: slow.append(x) or by_one(*x))
    assert getattr(many, batch)(items) == []
    return one, many, slow


def test_a_fill_left_to_the_slow_path_keeps_its_accounts_order():
    """A fill the kernel leaves over (here: a new account) takes every later fill of its
    account with it; other accounts' fills around it are applied by the kernel."""
    fills = [("new", "BTC-PERP", 1.0, 60_000.0, 0.0), ("old", "BTC-PERP", -1.0, 60_000.0, 1.0),
             ("new", "BTC-PERP", -2.0, 61_000.0, 0.5), ("old", "BTC-PERP", 1.0, 59_000.0, 0.0),
             ("new", "BTC-PERP", 1.0, 62_000.0, 0.0)]
    one, many, slow = _through_the_slow_path("apply_trade", "apply_trades", fills)
    assert slow == [fills[0], fills[2], fills[4]]  # in order; "old" went through the kernel
    assert _state(many) == _state(one)
    assert many.get("new", "BTC-PERP") == (0.0, 0.0)  # flat after +1, -2, +1


def _changes(rng, n, accts, assets):
    """Random balance changes: deposits, withdrawals (some to exactly zero, freeing the slot),
    new accounts and assets, and bad ones (NaN, infinite, absurd amounts, and withdrawals
    past the limit)."""
    out = []
    for _ in range(n):
        a = accts[int(rng.integers(len(accts)))]
        asset = assets[int(rng.integers(len(assets)))]
        # dyadic amounts sum exactly, so balances often come back to exactly zero
        amt = float(rng.choice([-1_000.0, -250.5, -0.5, 0.0, 0.5, 250.5, 1_000.0]))
        bad = rng.random()
        if bad < 0.01:
            amt = math.nan
        elif bad < 0.02:
            amt = -math.inf
        elif bad < 0.03:
            amt = 2e9
        elif bad < 0.04:
            amt = -9.9e8  # within the limit, but not the balance it leaves
        out.append((a, asset, amt))
    return out


@pytest.mark.parametrize("capacity,seed", [(1, 5), (2, 6), (8, 7)])
def test_balance_batches_build_the_same_book_as_one_by_one(capacity, seed):
    uni_one, uni_many = make_universe(), make_universe()
    rng = np.random.default_rng(seed)
    assets = ["USD", "USDT", "BTC", "ETH", "DOGE", "SOL"]  # the last two are new assets
    accts = [f"a{k}" for k in range(50)]
    changes = _changes(rng, 5000, accts, assets)
    one, many = E.AccountBook(uni_one, capacity=capacity), E.AccountBook(uni_many,
                                                                          capacity=capacity)
    for a in accts[:30]:
        for b in (one, many):
            b.apply_collateral(a, "USD", 1_000.0)
            b.apply_trade(a, "BTC-PERP", 0.5, 60_000.0, 1.0)
    expected = {}
    freed = 0
    for k, c in enumerate(changes):
        held = one.get(c[0], c[1]) != (0.0, 0.0)
        try:
            one.apply_collateral(*c)
        except E.EngineError as err:
            expected[k] = (type(err), str(err))
        freed += held and one.get(c[0], c[1]) == (0.0, 0.0)
    got = {}
    lo = 0
    while lo < len(changes):
        size = int(rng.integers(1, 300))
        for k, err in many.apply_collaterals(changes[lo:lo + size]):
            got[lo + k] = (type(err), str(err))
        lo += size
    assert got == expected
    assert len(expected) > 50
    assert _state(many) == _state(one)
    assert [i.id for i in uni_many.instruments] == [i.id for i in uni_one.instruments]
    assert capacity >= 6 or many.count.max() > capacity  # rows outgrew their regions
    assert freed > 20  # balances went back to exactly zero (their slot freed) along the way


def test_a_balance_change_left_to_the_slow_path_keeps_its_accounts_order():
    changes = [("new", "USD", 5.0), ("old", "USD", -1_000.0), ("new", "USD", -2.0),
               ("old", "BTC", 0.25), ("new", "USD", 1.0)]
    one, many, slow = _through_the_slow_path("apply_collateral", "apply_collaterals", changes)
    assert slow == [changes[0], changes[2], changes[4]]
    assert _state(many) == _state(one)
    assert many.get("new", "USD") == (4.0, 0.0)
    assert many.get("old", "USD") == (0.0, 0.0)  # withdrawn to zero: the slot is free
