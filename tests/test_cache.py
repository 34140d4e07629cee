"""KeyCache: hits and misses, max age, bound, one load for concurrent misses."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest

from sqlalchemy_kms.cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, KeyCache


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingLoader:
    """A loader that returns a fresh object per call and counts its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            self.calls += 1
            number = self.calls
        if self.delay:
            time.sleep(self.delay)
        return ("loaded", number)


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"


# -- hits and misses ---------------------------------------------------------------


def test_get_misses_then_hits_after_put() -> None:
    cache: KeyCache[str] = KeyCache(clock=FakeClock())
    assert cache.get(("patients", 1)) is None
    cache.put(("patients", 1), "key one")
    assert cache.get(("patients", 1)) == "key one"
    assert cache.get(("patients", 2)) is None
    assert cache.get(("doctors", 1)) is None
    assert len(cache) == 1


def test_get_or_load_loads_on_miss_and_hits_afterwards() -> None:
    cache: KeyCache[object] = KeyCache(clock=FakeClock())
    loader = CountingLoader()
    first = cache.get_or_load(("patients", 1), loader)
    assert loader.calls == 1
    assert (cache.hits, cache.misses) == (0, 1)

    second = cache.get_or_load(("patients", 1), loader)
    assert second is first
    assert loader.calls == 1
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.get(("patients", 1)) is first


def test_hits_and_misses_are_counted_per_key() -> None:
    cache: KeyCache[object] = KeyCache(clock=FakeClock())
    loader = CountingLoader()
    for _ in range(3):
        cache.get_or_load("a", loader)
    for _ in range(2):
        cache.get_or_load("b", loader)
    assert loader.calls == 2
    assert cache.misses == 2
    assert cache.hits == 3


def test_put_replaces_a_value() -> None:
    cache: KeyCache[str] = KeyCache(clock=FakeClock())
    cache.put("k", "old")
    cache.put("k", "new")
    assert cache.get("k") == "new"
    assert len(cache) == 1


# -- max age -------------------------------------------------------------------------


def test_entries_expire_after_max_age() -> None:
    clock = FakeClock(500.0)
    cache: KeyCache[str] = KeyCache(max_age=10, clock=clock)
    cache.put("k", "value")
    clock.advance(9.999)
    assert cache.get("k") == "value"
    clock.advance(0.001)
    assert cache.get("k") is None
    clock.advance(1000)
    assert cache.get("k") is None


def test_get_or_load_reloads_an_expired_entry() -> None:
    clock = FakeClock()
    cache: KeyCache[object] = KeyCache(max_age=60, clock=clock)
    loader = CountingLoader()
    first = cache.get_or_load("k", loader)
    clock.advance(59)
    assert cache.get_or_load("k", loader) is first
    assert loader.calls == 1

    clock.advance(1)
    second = cache.get_or_load("k", loader)
    assert loader.calls == 2
    assert second != first
    assert cache.misses == 2
    assert cache.hits == 1
    # the reloaded value lives for a full max_age from its load
    clock.advance(59)
    assert cache.get("k") is second


def test_expires_at() -> None:
    clock = FakeClock(200.0)
    cache: KeyCache[str] = KeyCache(max_age=30, clock=clock)
    assert cache.expires_at("k") == -math.inf
    cache.put("k", "v")
    assert cache.expires_at("k") == 230.0
    clock.advance(5)
    cache.put("k", "v2")
    assert cache.expires_at("k") == 235.0
    assert cache.expires_at("other") == -math.inf
    cache.invalidate("k")
    assert cache.expires_at("k") == -math.inf


def test_expires_at_follows_get_or_load() -> None:
    clock = FakeClock(10.0)
    cache: KeyCache[object] = KeyCache(max_age=2.5, clock=clock)
    cache.get_or_load("k", CountingLoader())
    assert cache.expires_at("k") == 12.5


def test_default_clock_is_monotonic() -> None:
    cache: KeyCache[str] = KeyCache(max_age=3600)
    before = time.monotonic()
    cache.put("k", "v")
    after = time.monotonic()
    assert before + 3600 <= cache.expires_at("k") <= after + 3600


# -- bound ---------------------------------------------------------------------------


def test_max_entries_drops_the_oldest() -> None:
    cache: KeyCache[str] = KeyCache(max_entries=3, clock=FakeClock())
    for name in "abc":
        cache.put(name, name.upper())
    cache.put("d", "D")
    assert len(cache) == 3
    assert cache.get("a") is None
    assert [cache.get(name) for name in "bcd"] == ["B", "C", "D"]

    cache.put("e", "E")
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(name) for name in "cde"] == ["C", "D", "E"]


def test_oldest_means_oldest_loaded_not_least_recently_read() -> None:
    cache: KeyCache[str] = KeyCache(max_entries=2, clock=FakeClock())
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # reading does not make "a" younger
    cache.put("c", "C")
    assert cache.get("a") is None
    assert cache.get("b") == "B"
    assert cache.get("c") == "C"


def test_reloading_a_key_makes_it_the_youngest() -> None:
    cache: KeyCache[str] = KeyCache(max_entries=2, clock=FakeClock())
    cache.put("a", "A")
    cache.put("b", "B")
    cache.put("a", "A2")
    cache.put("c", "C")
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") == "A2"
    assert cache.get("c") == "C"


def test_replacing_a_key_evicts_nothing_else() -> None:
    cache: KeyCache[str] = KeyCache(max_entries=2, clock=FakeClock())
    cache.put("a", "A")
    cache.put("b", "B")
    cache.put("b", "B2")
    assert len(cache) == 2
    assert cache.get("a") == "A"
    assert cache.get("b") == "B2"


def test_get_or_load_respects_max_entries() -> None:
    cache: KeyCache[object] = KeyCache(max_entries=2, clock=FakeClock())
    loader = CountingLoader()
    for key in range(5):
        cache.get_or_load(key, loader)
    assert len(cache) == 2
    assert cache.get(0) is None
    assert cache.get(2) is None
    assert cache.get(3) is not None
    assert cache.get(4) is not None
    assert loader.calls == 5


def test_max_entries_one() -> None:
    cache: KeyCache[str] = KeyCache(max_entries=1, clock=FakeClock())
    cache.put("a", "A")
    cache.put("b", "B")
    assert len(cache) == 1
    assert cache.get("a") is None
    assert cache.get("b") == "B"


def test_concurrent_puts_never_exceed_max_entries() -> None:
    cache: KeyCache[int] = KeyCache(max_entries=10, clock=FakeClock())
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(index: int) -> None:
        try:
            barrier.wait(10)
            for number in range(300):
                cache.put((index, number), number)
                assert len(cache) <= 10
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(16, worker)
    assert errors == []
    assert len(cache) == 10


# -- concurrent misses -----------------------------------------------------------------


def test_concurrent_misses_call_the_loader_once() -> None:
    cache: KeyCache[object] = KeyCache(clock=FakeClock())
    loader = CountingLoader(delay=0.3)
    barrier = threading.Barrier(16)
    results: list[object] = [None] * 16
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(10)
            results[index] = cache.get_or_load(("patients", 1), loader)
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(16, worker)
    assert errors == []
    assert loader.calls == 1
    assert all(result is results[0] for result in results)
    assert results[0] == ("loaded", 1)
    assert cache.misses == 1
    assert cache.hits == 15


def test_misses_of_different_keys_load_in_parallel() -> None:
    """Two keys' loaders run at the same time: one slow key does not block another."""
    cache: KeyCache[str] = KeyCache(clock=FakeClock())
    both_loading = threading.Barrier(2)
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        key = f"key{index}"

        def load() -> str:
            both_loading.wait(5)  # BrokenBarrierError if the loads were serialized
            return key.upper()

        try:
            results[key] = cache.get_or_load(key, load)
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(2, worker)
    assert errors == []
    assert results == {"key0": "KEY0", "key1": "KEY1"}


# -- loader failures -------------------------------------------------------------------


def test_loader_exception_propagates_and_is_not_cached() -> None:
    cache: KeyCache[str] = KeyCache(clock=FakeClock())
    calls = 0

    def failing() -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("KMS said no")

    with pytest.raises(RuntimeError, match="KMS said no"):
        cache.get_or_load("k", failing)
    assert cache.get("k") is None
    assert len(cache) == 0
    assert cache.expires_at("k") == -math.inf

    with pytest.raises(RuntimeError, match="KMS said no"):
        cache.get_or_load("k", failing)
    assert calls == 2

    loader = CountingLoader()
    value = cache.get_or_load("k", loader)
    assert loader.calls == 1
    assert cache.get("k") is value


def test_concurrent_misses_after_a_failed_load_load_again_once() -> None:
    """The first load fails for its caller only; one waiter loads again, the rest hit."""
    cache: KeyCache[str] = KeyCache(clock=FakeClock())
    barrier = threading.Barrier(16)
    calls = 0
    calls_lock = threading.Lock()
    results: list[str] = []
    errors: list[BaseException] = []

    def load() -> str:
        nonlocal calls
        with calls_lock:
            calls += 1
            number = calls
        time.sleep(0.2)
        if number == 1:
            raise RuntimeError("first load fails")
        return f"value {number}"

    def worker(index: int) -> None:
        try:
            barrier.wait(10)
            results.append(cache.get_or_load("k", load))
        except RuntimeError as exc:
            errors.append(exc)

    run_threads(16, worker)
    assert calls == 2
    assert len(errors) == 1
    assert results == ["value 2"] * 15


# -- invalidate and clear -------------------------------------------------------------


def test_invalidate_forgets_one_entry() -> None:
    cache: KeyCache[object] = KeyCache(clock=FakeClock())
    loader = CountingLoader()
    cache.get_or_load("a", loader)
    b = cache.get_or_load("b", loader)
    cache.invalidate("a")
    assert cache.get("a") is None
    assert cache.get("b") is b
    assert len(cache) == 1
    cache.get_or_load("a", loader)
    assert loader.calls == 3
    cache.invalidate("never stored")  # no error
    assert len(cache) == 2


def test_clear_forgets_every_entry() -> None:
    cache: KeyCache[object] = KeyCache(clock=FakeClock())
    loader = CountingLoader()
    for key in range(5):
        cache.get_or_load(key, loader)
    cache.clear()
    assert len(cache) == 0
    assert all(cache.get(key) is None for key in range(5))
    cache.get_or_load(0, loader)
    assert loader.calls == 6


# -- construction and repr -------------------------------------------------------------


def test_defaults() -> None:
    cache: KeyCache[str] = KeyCache()
    assert cache.max_entries == DEFAULT_MAX_ENTRIES
    assert cache.max_age == DEFAULT_MAX_AGE
    assert (cache.hits, cache.misses) == (0, 0)
    assert len(cache) == 0


def test_max_age_is_stored_as_float() -> None:
    cache: KeyCache[str] = KeyCache(max_age=7)
    assert cache.max_age == 7.0
    assert isinstance(cache.max_age, float)


@pytest.mark.parametrize("max_entries", [0, -1, -1000])
def test_constructor_rejects_bad_max_entries(max_entries: int) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        KeyCache(max_entries=max_entries)


@pytest.mark.parametrize("max_age", [0, 0.0, -1, -0.5, -math.inf])
def test_constructor_rejects_bad_max_age(max_age: float) -> None:
    with pytest.raises(ValueError, match="max_age"):
        KeyCache(max_age=max_age)


def test_constructor_rejects_nan_max_age() -> None:
    # NaN is not positive; accepted, it would make every entry expire at once, so
    # every use would go to the KMS
    with pytest.raises(ValueError, match="max_age"):
        KeyCache(max_age=math.nan)


def test_clock_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        KeyCache(10, 10, FakeClock())  # type: ignore[misc]


def test_repr_shows_no_values() -> None:
    cache: KeyCache[object] = KeyCache(max_entries=7, max_age=42, clock=FakeClock())
    secret = bytes(range(200, 232))
    cache.put(("patients", 1), secret)
    cache.put(("patients", 2), "very-secret-unwrapped-key")
    text = repr(cache)
    assert "KeyCache" in text
    assert "very-secret-unwrapped-key" not in text
    assert repr(secret) not in text
    assert secret.hex() not in text
