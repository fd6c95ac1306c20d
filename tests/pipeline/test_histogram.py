"""The worker's latency histogram: observing a batch at once counts exactly what observing
each value does (the same buckets, edges included, the same sum and count)."""
import numpy as np

from streams.app import LATENCY_BUCKETS, Histogram


def test_observe_many_matches_observe_one_by_one():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.exponential(0.05, 5000), np.array(LATENCY_BUCKETS),
                             np.array([0.0, 31.0, 1e9])])  # on every edge, and beyond the last
    one, many = Histogram("h", "help", LATENCY_BUCKETS), Histogram("h", "help", LATENCY_BUCKETS)
    for v in values.tolist():
        one.observe(v)
    for part in np.array_split(values, 7):
        many.observe_many(part)
    many.observe_many(np.zeros(0))
    assert many.counts == one.counts and many.n == one.n == values.size
    assert abs(many.sum - one.sum) <= 1e-9 * one.sum
    def exposition(h):
        return [line for line in h.text() if "_sum " not in line]
    assert exposition(many) == exposition(one)
