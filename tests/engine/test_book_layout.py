"""The account book's storage: accounts that outgrow their slots move alone, and every read
(positions, margin over ``start``/``end``, holders of an underlying) agrees with a plain
dict-of-positions model through random trades, deposits, closes and reloads."""
import numpy as np

import engine as E
from tests.engine.conftest import NOW, make_market, make_universe


def _model_positions(model, acct):
    return sorted((i, q, c) for i, (q, c) in model.get(acct, {}).items())


def test_random_operations_match_a_dict_model_and_margin_is_layout_independent():
    uni = make_universe()
    rs = make_market(uni).risk_set(NOW)
    rng = np.random.default_rng(5)
    book = E.AccountBook(uni, capacity=2)  # tiny regions: accounts move often
    model: dict[str, dict[str, tuple[float, float]]] = {}
    ids = [inst.id for inst in uni.instruments if inst.kind != E.Kind.SPOT]
    accts = [f"a{k}" for k in range(40)]
    for step in range(4000):
        a = accts[int(rng.integers(len(accts)))]
        op = rng.random()
        if op < 0.1:
            book.apply_collateral(a, "USD", 1000.0)
        elif op < 0.8:
            inst = ids[int(rng.integers(len(ids)))]
            book.apply_trade(a, inst, float(rng.choice([-1, 1]) * 0.5), 100.0)
        elif op < 0.95 and book.positions(a):
            p = book.positions(a)[int(rng.integers(len(book.positions(a))))]
            book.set(a, p.instrument, 0.0, 0.0)  # close: frees the slot
        else:
            book.load(a, book.positions(a)[::-1])  # reload in another order
        model[a] = {p.instrument: (p.quantity, p.cost) for p in book.positions(a)}
    moved = book._start[:len(book.ids)] != np.arange(len(book.ids)) * 2
    assert moved.any() and book.count.max() > 2  # regions did move and grow

    # every account's slots are inside its own region, and regions never overlap
    n = len(book.ids)
    spans = sorted((int(book._start[r]), int(book._start[r] + book._capa[r])) for r in range(n))
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    assert (book.count[:n] <= book._capa[:n]).all()

    # the same positions, rebuilt densely, margin bit-identically
    k = int(book.count[:n].max())
    inst = np.zeros((n, k), dtype=np.int64)
    qty = np.zeros((n, k))
    cost = np.zeros((n, k))
    for r, a in enumerate(book.ids):
        for j, (i, q, c) in enumerate(book.position_tuples(a)):
            inst[r, j], qty[r, j], cost[r, j] = uni.row(i), q, c
    usd = uni.row("USD")
    for r in range(n):  # pad with zero USD balances (no effect on any figure)
        inst[r, int(book.count[r]):] = usd
    dense = E.AccountBook.from_dense(uni, book.ids, inst, qty, cost)
    got, want = book.margin(rs), dense.margin(rs)
    for f in ("equity", "im", "mm"):
        assert np.array_equal(getattr(got, f), getattr(want, f)), f

    # holders of an underlying, or of any of several: the compiled scan equals a scan of
    # the model
    def holders(unds):
        return [r for r, a in enumerate(book.ids) if any(
            uni.instruments[uni.row(i)].underlying in unds or i in unds
            for i in model.get(a, {}))]
    for und in ("BTC", "ETH"):
        assert book.rows_holding(und).tolist() == holders({und}), und
    assert book.rows_holding_any(["ETH", "BTC"]).tolist() == holders({"BTC", "ETH"})
    assert book.rows_holding_any(["ETH"]).tolist() == holders({"ETH"}) != holders({"BTC"})


def test_margin_job_results_hold_for_rows_not_written_meanwhile():
    """A margin job made before a burst of writes (trades, closes, reloads, accounts moving to
    new regions, the slot arrays reallocated, new accounts) and run after it: exactly the rows
    written meanwhile are flagged, and every other row's result equals margining the book as it
    is now, bit for bit. This is what lets a market tick's kernel run beside account batches."""
    uni = make_universe()
    rs = make_market(uni).risk_set(NOW)
    rng = np.random.default_rng(8)
    book = E.AccountBook(uni, capacity=2)
    ids = [inst.id for inst in uni.instruments if inst.kind != E.Kind.SPOT]
    accts = [f"a{k}" for k in range(300)]
    for a in accts:
        book.apply_collateral(a, "USD", 50_000.0)
        book.apply_trade(a, ids[int(rng.integers(len(ids)))], 0.5, 100.0)
    rows = np.arange(len(book.ids), dtype=np.int64)
    job = book.margin_job(rs, rows)
    arrays_before = book.qty
    written = set()
    for step in range(400):
        a = accts[int(rng.integers(len(accts)))]
        written.add(a)
        op = rng.random()
        if op < 0.8:  # new instruments overflow the 2-slot regions: accounts move
            book.apply_trade(a, ids[int(rng.integers(len(ids)))], float(rng.choice([-1, 1])),
                             100.0)
        elif op < 0.9 and book.positions(a):
            book.set(a, book.positions(a)[0].instrument, 0.0, 0.0)
        else:
            book.load(a, book.positions(a)[::-1])
    for k in range(2000):  # new accounts: rows and slot arrays grow
        book.apply_collateral(f"new{k}", "USD", 1.0)
    assert book.qty is not arrays_before  # the job reads arrays the book has replaced
    res = job.run()
    same = book.unchanged(job)
    assert {book.ids[r] for r in rows[~same]} == written
    now = book.margin(rs, rows[same])
    part = res.take(np.flatnonzero(same))
    for f in ("equity", "im", "mm", "worst_underlying", "worst_scenario", "worst_pnl",
              "greeks"):
        assert np.array_equal(getattr(part, f), getattr(now, f)), f


def test_loading_from_arrays_matches_loading_position_by_position():
    """``load_arrays`` (a restart's bulk load) against ``load``: the same slots in the same
    order, zero positions left out, an instrument given twice as ``load`` does it (the last
    wins), and the same errors for values ``load`` refuses."""
    uni = make_universe()
    rng = np.random.default_rng(11)
    names = [inst.id for inst in uni.instruments]
    by_load, by_arrays = E.AccountBook(uni, capacity=2), E.AccountBook(uni, capacity=2)
    for step in range(600):
        a = f"a{int(rng.integers(30))}"
        k = int(rng.integers(0, 12))
        picked = [names[int(i)] for i in rng.integers(len(names), size=k)]
        qty = rng.choice([0.0, -2.5, 1.0, 3.0], size=k)
        cost = rng.choice([0.0, 10.0, -4.0], size=k)
        if step % 7 == 0 and k:
            picked[-1] = picked[0]  # an instrument twice
        by_load.load(a, [E.Position(i, q, c) for i, q, c in zip(picked, qty, cost)])
        by_arrays.load_arrays(a, [uni.row(i) for i in picked], qty, cost)
        assert by_arrays.position_tuples(a) == by_load.position_tuples(a), (step, a)
    assert by_arrays.ids == by_load.ids
    for a in by_load.ids:
        assert by_arrays.position_tuples(a) == by_load.position_tuples(a), a

    row = uni.row(names[0])
    for q, c in ((float("nan"), 0.0), (1.0, float("inf")), (2e9, 0.0)):
        errors = []
        for book, load in ((by_load, lambda: by_load.load("bad", [E.Position(names[0], q, c)])),
                           (by_arrays, lambda: by_arrays.load_arrays("bad", [row],
                                                                     np.array([q]),
                                                                     np.array([c])))):
            try:
                load()
            except E.EngineError as exc:
                errors.append((type(exc), str(exc)))
        assert len(errors) == 2 and errors[0] == errors[1], (q, c, errors)
