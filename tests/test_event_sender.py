"""The worker's background event sender: order kept, failures reported to the batch loop."""

from __future__ import annotations

import pytest
import redis

from shared.events import EventPublisher, read_backlog
from workers.event_sender import EventSender


def test_batches_arrive_in_order_and_flush_waits_for_them(redis_client):
    sender = EventSender(redis_client)
    first, second = EventPublisher(redis_client, "a", 60), EventPublisher(redis_client, "b", 60)
    for index in range(50):
        sender.send([(first, "token", {"index": index}), (second, "token", {"index": index})])
    sender.flush()
    for job_id in ("a", "b"):
        events = read_backlog(redis_client, job_id)
        assert [e.id for e in events] == list(range(1, 51))
        assert [e.data["index"] for e in events] == list(range(50))


def test_a_failed_send_reaches_the_batch_loop(redis_client):
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    sender = EventSender(unreachable)
    sender.send([(EventPublisher(unreachable, "a", 60), "token", {"index": 0})])
    with pytest.raises(redis.ConnectionError):
        sender.flush()
    sender.flush()  # reported once; the sender keeps working
    sender.send([(EventPublisher(unreachable, "b", 60), "token", {"index": 0})])
    assert isinstance(sender.flush(raise_error=False), redis.ConnectionError)
