"""KeyCache's documented defaults, bounds and the path that never waits.

``test_cache.py`` covers hits, expiry, eviction and single-flight loading;
these tests pin the exact numbers (the defaults the README documents, the
moment an entry expires) and the ``single_flight=False`` path an event loop
uses.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest

from sqlalchemy_kms import cache as cache_module
from sqlalchemy_kms.cache import KeyCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_exported_names() -> None:
    assert cache_module.__all__ == ["DEFAULT_MAX_AGE", "DEFAULT_MAX_ENTRIES", "KeyCache"]
    for name in cache_module.__all__:
        assert hasattr(cache_module, name)


def test_documented_defaults() -> None:
    assert cache_module.DEFAULT_MAX_ENTRIES == 1000
    assert cache_module.DEFAULT_MAX_AGE == 300.0
    cache: KeyCache[str] = KeyCache()
    assert (cache.max_entries, cache.max_age) == (1000, 300.0)


def test_default_bound_is_1000_entries() -> None:
    cache: KeyCache[int] = KeyCache(clock=Clock())
    for number in range(1001):
        cache.put(number, number)
    assert len(cache) == 1000
    assert cache.get(0) is None
    assert cache.get(1) == 1 and cache.get(1000) == 1000


def test_default_max_age_is_300_seconds() -> None:
    clock = Clock()
    cache: KeyCache[str] = KeyCache(clock=clock)
    cache.put("k", "v")
    assert cache.expires_at("k") == 400.0
    clock.now = 399.999
    assert cache.get("k") == "v"
    clock.now = 400.0
    assert cache.get("k") is None


@pytest.mark.parametrize("max_age", [1e-9, 0.5, 1])
def test_any_positive_max_age_is_accepted(max_age: float) -> None:
    assert KeyCache(max_age=max_age).max_age == max_age


def test_max_entries_one_is_accepted() -> None:
    assert KeyCache(max_entries=1).max_entries == 1


def test_constructor_refusals_say_why() -> None:
    with pytest.raises(ValueError) as info:
        KeyCache(max_entries=0)
    assert str(info.value) == "max_entries must be at least 1"
    with pytest.raises(ValueError) as info:
        KeyCache(max_age=0)
    assert str(info.value) == "max_age must be positive"


def test_expires_at_of_a_missing_key_is_minus_infinity() -> None:
    assert KeyCache(clock=Clock()).expires_at("absent") == float("-inf")


# -- single_flight=False -----------------------------------------------------------------


def test_without_single_flight_a_miss_loads_and_stores() -> None:
    clock = Clock()
    cache: KeyCache[str] = KeyCache(max_age=10, clock=clock)
    calls: list[str] = []

    def load() -> str:
        calls.append("load")
        return f"value {len(calls)}"

    assert cache.get_or_load("k", load, single_flight=False) == "value 1"
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.get("k") == "value 1"
    assert cache.expires_at("k") == 110.0
    assert cache.get_or_load("k", load, single_flight=False) == "value 1"
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)
    clock.now = 110.0
    assert cache.get_or_load("k", load, single_flight=False) == "value 2"
    assert (cache.hits, cache.misses, len(calls)) == (1, 2, 2)


def test_without_single_flight_a_miss_does_not_wait_for_another_loader() -> None:
    cache: KeyCache[str] = KeyCache()
    loading = threading.Event()
    release = threading.Event()

    def slow() -> str:
        loading.set()
        release.wait(30)
        return "slow"

    thread = threading.Thread(target=lambda: cache.get_or_load("k", slow))
    thread.start()
    try:
        assert loading.wait(30)
        # the other thread holds the key's load lock: this call must not block on it
        assert cache.get_or_load("k", lambda: "fast", single_flight=False) == "fast"
        assert cache.misses == 2
    finally:
        release.set()
        thread.join(30)
    assert not thread.is_alive()
    # the slower load finished last and replaced the value
    assert cache.get("k") == "slow"


def test_single_flight_is_the_default() -> None:
    cache: KeyCache[str] = KeyCache()
    loading = threading.Event()
    release = threading.Event()
    second_done = threading.Event()
    results: list[str] = []

    def slow() -> str:
        loading.set()
        release.wait(30)
        return "first"

    def second() -> None:
        results.append(cache.get_or_load("k", lambda: "second"))
        second_done.set()

    first = threading.Thread(target=lambda: cache.get_or_load("k", slow))
    first.start()
    assert loading.wait(30)
    waiter = threading.Thread(target=second)
    waiter.start()
    # the second caller waits for the first load instead of loading itself
    assert not second_done.wait(0.2)
    release.set()
    first.join(30)
    waiter.join(30)
    assert results == ["first"]
    assert (cache.hits, cache.misses) == (1, 1)


# -- leaving the cache: on_evict, sweep, oldest_expiry -------------------------------------


class Evictions:
    def __init__(self) -> None:
        self.seen: list[tuple[object, object]] = []

    def __call__(self, key: object, value: object) -> None:
        self.seen.append((key, value))


def test_oldest_expiry() -> None:
    clock = Clock()
    cache: KeyCache[str] = KeyCache(max_entries=2, max_age=10, clock=clock)
    assert cache.oldest_expiry() == float("inf")
    cache.put("a", "A")
    clock.now = 105.0
    cache.put("b", "B")
    assert cache.oldest_expiry() == 110.0
    cache.put("c", "C")  # drops "a"
    assert cache.oldest_expiry() == 115.0


def test_on_evict_is_told_of_every_value_that_leaves() -> None:
    evictions = Evictions()
    cache: KeyCache[object] = KeyCache(max_entries=2, clock=Clock(), on_evict=evictions)
    one, two, three, other = object(), object(), object(), object()
    cache.put("a", one)
    cache.put("b", two)
    cache.put("a", one)  # the same value again: nothing leaves
    assert evictions.seen == []
    cache.put("a", other)  # replaced
    assert evictions.seen == [("a", one)]
    cache.put("c", three)  # over the bound: the oldest, "b", goes
    assert evictions.seen == [("a", one), ("b", two)]
    cache.invalidate("c")
    cache.invalidate("absent")
    assert evictions.seen == [("a", one), ("b", two), ("c", three)]
    cache.clear()  # by design, not told
    assert len(evictions.seen) == 3


def test_sweep_drops_exactly_the_expired_entries() -> None:
    clock = Clock()
    evictions = Evictions()
    cache: KeyCache[str] = KeyCache(max_age=10, clock=clock, on_evict=evictions)
    cache.put("a", "A")
    clock.now = 103.0
    cache.put("b", "B")
    clock.now = 109.999
    assert cache.sweep() == 0
    clock.now = 110.0  # "a" expires at 110.0: as get() says, it is gone at that instant
    assert cache.get("a") is None
    assert cache.sweep() == 1
    assert evictions.seen == [("a", "A")]
    assert cache.get("b") == "B" and len(cache) == 1
    clock.now = 200.0
    assert cache.sweep() == 1
    assert len(cache) == 0
    assert cache.sweep() == 0


# -- the load locks are bookkeeping that must not outlive the loads -----------------------


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition never became true"
        time.sleep(0.001)


def test_no_load_lock_is_left_after_loads() -> None:
    cache: KeyCache[int] = KeyCache(max_entries=10)
    for number in range(100):
        assert cache.get_or_load(number, functools.partial(int, number)) == number
    assert cache._loading == {}


def test_load_locks_count_their_waiters() -> None:
    """A loader fails while another waits: the lock stays for the waiter, then goes."""
    cache: KeyCache[str] = KeyCache()
    first_in, first_go = threading.Event(), threading.Event()
    second_in, second_go = threading.Event(), threading.Event()

    def failing() -> str:
        first_in.set()
        first_go.wait(30)
        raise RuntimeError("KMS unavailable")

    def loading() -> str:
        second_in.set()
        second_go.wait(30)
        return "loaded"

    def first_caller() -> None:
        with pytest.raises(RuntimeError):
            cache.get_or_load("k", failing)

    first = threading.Thread(target=first_caller)
    second = threading.Thread(target=lambda: cache.get_or_load("k", loading))
    first.start()
    try:
        assert first_in.wait(30)
        lock, waiting = cache._loading["k"]
        assert waiting == 1
        second.start()
        wait_for(lambda: cache._loading["k"][1] == 2)
        first_go.set()
        first.join(30)
        assert second_in.wait(30)
        # the first caller is gone; the second still holds the same lock
        assert cache._loading["k"] == (lock, 1)
    finally:
        first_go.set()
        second_go.set()
        first.join(30)
        if second.ident is not None:
            second.join(30)
    assert cache._loading == {}
    assert cache.get("k") == "loaded"
