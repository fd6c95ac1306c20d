"""Pre-trade what-if from the command line: rebuild the market and one account from Kafka
(the broadcast topics and the worker's account changelog), then margin the account with and
without hypothetical trades. Read-only: nothing is published."""
from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

import engine as E
from schemas import Codec

from .processor import RiskProcessor, account_from_bytes
from .settings import Settings


def _read_all(s: Settings, topic: str, on_message) -> None:
    c = Consumer({**s.kafka_conf(), "group.id": "riskpipe-whatif", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None:
        c.close()
        raise ValueError(f"topic {topic} does not exist")
    tps, ends = [], {}
    for p in md.partitions:
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if hi > lo:
            tps.append(TopicPartition(topic, p, lo))
            ends[p] = hi
    c.assign(tps)
    done = {p for p in ends if ends[p] == 0}
    while len(done) < len(ends):
        m = c.poll(1.0)
        if m is None or m.error():
            continue
        on_message(m)
        if m.offset() + 1 >= ends[m.partition()]:
            done.add(m.partition())
    c.close()


def what_if(s: Settings, account: str, trades: list[tuple[str, float, float]]) -> dict:
    codec = Codec()
    proc = RiskProcessor()
    for name in ("instruments", "risk-params", "quotes"):
        def apply(m, name=name):
            kind, rec = codec.decode(m.value())
            if kind == "Instrument":
                proc.apply_instrument(rec)
            elif kind == "RiskParams":
                proc.apply_risk_params(rec)
            else:
                try:
                    proc.apply_quote(rec)
                except E.EngineError:
                    pass
        _read_all(s, s.topic(name), apply)
    found = {}

    def account_rec(m):
        if m.key() == account.encode():
            found["rec"] = account_from_bytes(m.value()) if m.value() else None
    _read_all(s, f"{s.app_id}-accounts-changelog", account_rec)
    if not found.get("rec"):
        raise ValueError(f"account {account!r} has no state yet (no trades or deposits seen)")
    proc.load_account(account, found["rec"])
    rs = proc.risk_set()
    before, after = E.what_if(proc.book, account, trades, rs)
    return {"account": account, "trades": [list(t) for t in trades],
            "before": {"equity": before.equity, "im": before.im, "mm": before.mm,
                       "shortfall": before.shortfall},
            "after": {"equity": after.equity, "im": after.im, "mm": after.mm,
                      "shortfall": after.shortfall},
            "im_change": after.im - before.im,
            "accepted": after.equity >= after.im}
