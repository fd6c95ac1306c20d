"""The bench's count of a restarted worker's replay: every record in the changelog, read
through, against the real broker (a compacted log's offsets would not count them)."""
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.bench_pipeline import _changelog_records

pytestmark = pytest.mark.kafka


def test_changelog_records_counts_every_record_of_every_partition(settings):
    app_id = f"count-{settings.app_id}"
    topic = f"{app_id}-accounts-changelog"
    admin = AdminClient(settings.kafka_conf())  # kept until the topic exists
    for f in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        f.result(30)
    p = Producer(settings.kafka_conf())
    sent = {0: 5, 1: 0, 2: 1234}  # an empty partition too
    for part, n in sent.items():
        for i in range(n):
            p.produce(topic, key=f"acct-{i % 7}".encode(), value=b"x" * 50, partition=part)
    assert p.flush(30) == 0
    assert _changelog_records(settings, app_id) == sum(sent.values())
