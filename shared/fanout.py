"""One Redis pub/sub connection per process, fanned out to the process's open event streams.

A stream used to hold a pub/sub connection of its own, so an API process with 200 open streams held 200
Redis connections. Here one listener thread per `EventHub` holds the only pub/sub connection, subscribes to
the channels its streams follow, and hands each message to every local stream of that channel through its
own in-memory queue.

Pub/sub is only the wake-up: the job's backlog (`shared.events`) is what a stream reads when in doubt. When
the listener loses its connection (Redis restarted, a network blip), every stream is told to read its
backlog (`RESYNC`), and again once the listener has subscribed anew, so nothing published in between is
lost. A `Subscription` is handed out only after Redis confirmed the channel's SUBSCRIBE, so a reader that
subscribes, then reads the backlog, then follows its queue misses nothing.

Only the listener thread touches the `PubSub` object (it is not thread-safe); a stream asks for a channel by
registering it and publishing on the hub's own control channel, which wakes the listener at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

RESYNC = "resync"
"""Queued to a stream when messages may have been missed: read the backlog after the last event seen."""

INTERRUPT = "interrupt"
"""Queued to a resumable stream when the process is stopping: end it so the client resumes elsewhere."""

LISTEN_S = 1.0
"""Longest the listener blocks on its connection; it also applies unsubscriptions this often."""

SUBSCRIBE_TIMEOUT_S = 5.0
"""How long a stream waits for its channel's SUBSCRIBE to be confirmed before the store counts as down."""

RECONNECT_S = 0.5
"""Pause between the listener's attempts to reconnect to Redis."""

IDLE_EXIT_S = 10.0
"""A listener with no stream to serve for this long closes its connection and ends (the next stream starts
another)."""

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class StreamInterrupted(Exception):
    """The process is stopping: a resumable stream ends here and its client resumes with Last-Event-ID."""


class Subscription:
    """A stream's view of one channel: the messages published on it (raw data) and `RESYNC`/`INTERRUPT`."""

    def __init__(self, hub: EventHub, channel: str, resumable: bool):
        self.hub = hub
        self.channel = channel
        self.resumable = resumable
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()

    def get(self, timeout: float) -> bytes | str | None:
        """The next message's data, `RESYNC` or `INTERRUPT`; None after `timeout` seconds of nothing."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop receiving; the hub unsubscribes the channel when no local stream follows it any more."""
        self.hub.release(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class EventHub:
    """The process's single pub/sub connection to `connection`'s Redis, shared by every stream."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection
        self.control = f"llm:relay:{uuid.uuid4().hex}"  # this hub's own channel, for waking the listener
        self._lock = threading.Lock()
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._on: set[str] = set()  # channels whose last command sent was SUBSCRIBE
        self._live: set[str] = set()  # ... and whose every SUBSCRIBE sent has been confirmed
        self._unconfirmed: dict[str, int] = defaultdict(int)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def subscribe(self, channel: str, *, resumable: bool = False) -> Subscription:
        """A subscription to `channel`, returned once Redis has confirmed it (ConnectionError if it cannot).

        `resumable` streams are ended by `interrupt_streams` (their client can resume); the others (a blocking
        answer being collected) are left to finish.
        """
        subscription = Subscription(self, channel, resumable)
        with self._lock:
            self._subscriptions[channel].add(subscription)
            if channel in self._live:
                subscription.ready.set()
            if self._stopping and resumable:
                subscription.inbox.put(INTERRUPT)
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="event-hub", daemon=True)
                self._thread.start()
        if subscription.ready.is_set():
            return subscription
        try:
            self.connection.publish(self.control, b"")  # wake the listener: it subscribes now
            if not subscription.ready.wait(SUBSCRIBE_TIMEOUT_S):
                raise RedisTimeoutError(f"the event relay could not subscribe to {channel} in {SUBSCRIBE_TIMEOUT_S} s")
        except BaseException:
            self.release(subscription)
            raise
        return subscription

    def release(self, subscription: Subscription) -> None:
        """Forget `subscription`; the listener unsubscribes an unfollowed channel on its next turn."""
        with self._lock:
            followers = self._subscriptions.get(subscription.channel)
            if followers is not None:
                followers.discard(subscription)
                if not followers:
                    del self._subscriptions[subscription.channel]

    def interrupt_streams(self) -> int:
        """End every resumable stream now and any that starts from now on (the process is stopping).

        Returns how many streams were interrupted.
        """
        with self._lock:
            self._stopping = True
            resumable = [sub for subs in self._subscriptions.values() for sub in subs if sub.resumable]
        for subscription in resumable:
            subscription.inbox.put(INTERRUPT)
        return len(resumable)

    def followed_channels(self) -> int:
        """How many channels local streams follow with their subscription in place (tests, benchmarks)."""
        with self._lock:
            return len(self._live.intersection(self._subscriptions))

    def _listen(self) -> None:
        """The listener thread: (re)connect, apply subscriptions, hand messages out; end when idle."""
        pubsub = None
        idle_since = time.monotonic()
        while True:
            try:
                if pubsub is None:
                    pubsub = self._connect()
                if not self._apply(pubsub):
                    if time.monotonic() - idle_since >= IDLE_EXIT_S and self._exit_if_idle():
                        pubsub.close()
                        return
                else:
                    idle_since = time.monotonic()
                message = pubsub.get_message(timeout=LISTEN_S)
                if message is not None:
                    self._dispatch(message)
            except CONNECTION_ERRORS as exc:
                log.warning("event relay lost its Redis connection (%s); streams re-read their backlog", exc)
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._connection_lost()
                if self._exit_if_idle():  # no stream waits: stop retrying; the next stream starts a listener
                    return
                time.sleep(RECONNECT_S)

    def _connect(self):
        """A fresh pub/sub connection subscribed to the control channel (its confirmation is read later)."""
        pubsub = self.connection.pubsub()
        pubsub.subscribe(self.control)
        return pubsub

    def _apply(self, pubsub) -> bool:
        """Send the SUBSCRIBE and UNSUBSCRIBE the streams' comings and goings call for; whether any stream
        is left to serve."""
        with self._lock:
            leaving = [channel for channel in self._on if channel not in self._subscriptions]
            joining = [channel for channel in self._subscriptions if channel not in self._on]
            self._on.difference_update(leaving)
            self._live.difference_update(leaving)
            self._on.update(joining)
            for channel in joining:
                self._unconfirmed[channel] += 1
            busy = bool(self._subscriptions)
        if leaving:
            pubsub.unsubscribe(*leaving)
        if joining:
            pubsub.subscribe(*joining)
        return busy

    def _exit_if_idle(self) -> bool:
        """End the listener if still no stream needs it (a stream arriving later starts a new one)."""
        with self._lock:
            if self._subscriptions:
                return False
            self._thread = None
            self._on.clear()
            self._live.clear()
            self._unconfirmed.clear()
            return True

    def _dispatch(self, message: dict) -> None:
        """Hand a message to the channel's local streams; a SUBSCRIBE confirmation makes its streams ready."""
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if message["type"] == "subscribe" and channel != self.control:
            self._confirmed(channel)
        elif message["type"] == "message" and channel != self.control:
            with self._lock:
                followers = list(self._subscriptions.get(channel, ()))
            for subscription in followers:
                subscription.inbox.put(message["data"])

    def _confirmed(self, channel: str) -> None:
        """Redis confirmed a SUBSCRIBE: once every one sent is, the channel is live; its streams that were
        already following (a re-subscription after a reconnect) re-read their backlog."""
        with self._lock:
            self._unconfirmed[channel] -= 1
            if self._unconfirmed[channel] > 0:
                return
            del self._unconfirmed[channel]
            if channel not in self._on:
                return
            self._live.add(channel)
            followers = list(self._subscriptions.get(channel, ()))
        for subscription in followers:
            if subscription.ready.is_set():
                subscription.inbox.put(RESYNC)
            else:
                subscription.ready.set()

    def _connection_lost(self) -> None:
        """Every channel must be subscribed again; meanwhile every stream reads its backlog (which raises
        in the stream while Redis is down: it then ends with `unavailable`, as it always has)."""
        with self._lock:
            self._on.clear()
            self._live.clear()
            self._unconfirmed.clear()
            followers = [sub for subs in self._subscriptions.values() for sub in subs if sub.ready.is_set()]
        for subscription in followers:
            subscription.inbox.put(RESYNC)
