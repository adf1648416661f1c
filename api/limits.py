"""The per-key limit on concurrent requests (MAX_CONCURRENT_PER_KEY, with API keys on).

Every request made with a key holds a lease in `llm:key:<sha256>:requests` (a sorted set: lease id ->
deadline) from its start until its response is closed, a stream's last byte included, so the limit holds
across every API process and host. Taking one is a Lua script: drop expired leases, count, add. A request
over the limit gets 429 with `Retry-After`, as the pools' admission bound answers (`OverloadedError`).

Leases are short (LEASE_S) and each process renews its own every RENEW_S, so the leases of a process that
dies (SIGKILL, OOM) lapse within LEASE_S instead of holding the key's slots for a stream's whole life.
Cancelling (`DELETE`) and CORS preflights take no lease: stopping work is never refused.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from flask import Flask, Response, current_app, g, request
from redis.exceptions import RedisError

from api.auth import ApiKey, current_key
from api.extensions import get_redis
from shared.exceptions import OverloadedError

log = logging.getLogger(__name__)

EXTENSION_KEY = "llm_key_limit"

LEASE_S = 30.0
"""A lease lapses this long after its last renewal."""

RENEW_S = 10.0
"""How often a process renews the leases of its requests in progress."""

RETRY_AFTER_S = 1
"""The `Retry-After` of a 429: one of the key's requests may well have ended by then."""

EXEMPT_METHODS = frozenset({"OPTIONS", "DELETE"})

ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
"""KEYS[1]: the key's lease set; ARGV: now, the new lease's deadline, the limit, its id, the set's TTL."""


def lease_set(key: ApiKey) -> str:
    """The Redis sorted set of a key's leases."""
    return f"llm:key:{key.owner}:requests"


class Lease:
    """One request's place in its key's limit, given back once when the response closes."""

    def __init__(self, limiter: KeyLimiter, connection: redis.Redis, name: str, lease_id: str):
        self.limiter, self.connection, self.name, self.lease_id = limiter, connection, name, lease_id
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.limiter.forget(self)
        try:
            self.connection.zrem(self.name, self.lease_id)
        except RedisError as exc:  # it lapses within LEASE_S anyway
            log.warning("could not release a per-key lease: %s", exc)


class KeyLimiter:
    """Takes and renews the leases of one API process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: dict[str, Lease] = {}
        self.lock = threading.Lock()
        self.renewer: threading.Thread | None = None

    def acquire(self, connection: redis.Redis, key: ApiKey) -> Lease:
        """A lease for a request of `key`; OverloadedError (429) when the key has `limit` requests going."""
        lease = Lease(self, connection, lease_set(key), uuid.uuid4().hex)
        now = time.time()
        taken = connection.eval(ACQUIRE, 1, lease.name, now, now + LEASE_S, self.limit, lease.lease_id,
                                int(LEASE_S) + 1)
        if not taken:
            raise OverloadedError(
                f"this API key ({key.name}) has {self.limit} requests in progress, the most MAX_CONCURRENT_PER_KEY "
                f"allows; retry once one has ended", retry_after_s=RETRY_AFTER_S)
        with self.lock:
            self.held[lease.lease_id] = lease
            if self.renewer is None or not self.renewer.is_alive():
                self.renewer = threading.Thread(target=self._renew_forever, name="key-lease-renewer", daemon=True)
                self.renewer.start()
        return lease

    def forget(self, lease: Lease) -> None:
        with self.lock:
            self.held.pop(lease.lease_id, None)

    def renew(self) -> None:
        """Push the deadline of every lease this process holds LEASE_S ahead."""
        with self.lock:
            leases = list(self.held.values())
        deadline = time.time() + LEASE_S
        by_connection: dict[int, tuple[redis.Redis, list[Lease]]] = {}
        for lease in leases:
            by_connection.setdefault(id(lease.connection), (lease.connection, []))[1].append(lease)
        for connection, group in by_connection.values():
            with connection.pipeline(transaction=False) as pipe:
                for lease in group:
                    pipe.zadd(lease.name, {lease.lease_id: deadline}, xx=True)
                    pipe.expire(lease.name, int(LEASE_S) + 1)
                pipe.execute()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(RENEW_S)
            try:
                self.renew()
            except RedisError as exc:  # Redis restarting: try again at the next round
                log.warning("could not renew per-key leases: %s", exc)


def init_app(app: Flask, limit: int) -> None:
    """With a limit, every request made with a key takes a lease first (after the key and owner checks)."""
    if limit <= 0:
        return
    app.extensions[EXTENSION_KEY] = KeyLimiter(limit)
    app.before_request(take_lease)
    app.after_request(hand_over_lease)
    app.teardown_request(drop_lease)


def take_lease() -> None:
    key = current_key()
    if key is None or request.method in EXEMPT_METHODS:
        return
    g.key_lease = current_app.extensions[EXTENSION_KEY].acquire(get_redis(), key)


def hand_over_lease(response: Response) -> Response:
    """The lease is given back when the response is closed: after a stream's last byte."""
    lease = g.pop("key_lease", None)
    if lease is not None:
        response.call_on_close(lease.release)
    return response


def drop_lease(_error: BaseException | None) -> None:
    """A request that never reached `after_request` gives its lease back now."""
    lease = g.pop("key_lease", None)
    if lease is not None:
        lease.release()
