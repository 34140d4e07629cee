"""What a vault does around each statement of its engine: count, and preload keys.

:class:`StatementHooks` listens to the engine's ``after_cursor_execute``:

* it counts the statements that use encrypted columns, and how many of them
  needed no KMS call (``stats()["cache_hits"]``): one count per statement, so
  the per-value hot path pays nothing for it;
* and, on an async engine, it loads the keys the statement's encrypted result
  columns need while the statement still runs inside SQLAlchemy's greenlet:
  rows of an async result are decoded after the ``await``, where the key
  table can no longer be queried.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ._connections import Connections
from ._keyloader import KeyLoader
from ._keys import KeyStore
from ._keytable import KeySeries
from .types import result_series, statement_series

__all__ = ["StatementHooks"]

# connection.info: the provider's unwraps counted before the statement bound its values
_MISSES_BEFORE = "sqlalchemy_kms.misses_before"


class StatementHooks:
    """The per-statement work of one vault's engine."""

    def __init__(
        self,
        engine: Engine,
        connections: Connections,
        store: KeyStore,
        loader: KeyLoader,
        *,
        refresh_interval: float,
    ) -> None:
        self.engine = engine
        self.connections = connections
        self.store = store
        self.loader = loader
        self.refresh_interval = refresh_interval
        self.is_async = bool(engine.dialect.is_async)
        #: Statements that used encrypted columns, and those of them that needed no KMS call.
        self.statements = 0
        self.hits = 0
        self._guard = threading.Lock()
        self._series: weakref.WeakKeyDictionary[Any, tuple[frozenset[KeySeries], ...]] = (
            weakref.WeakKeyDictionary()
        )
        self._preloaded: dict[KeySeries, float] = {}

    def listen(self) -> None:
        """Install the engine event."""
        event.listen(self.engine, "before_execute", self._before_execute)
        event.listen(self.engine, "after_cursor_execute", self._after_execute)

    def close(self) -> None:
        """Remove the engine event."""
        if event.contains(self.engine, "after_cursor_execute", self._after_execute):
            event.remove(self.engine, "after_cursor_execute", self._after_execute)
        if event.contains(self.engine, "before_execute", self._before_execute):
            event.remove(self.engine, "before_execute", self._before_execute)
        with self._guard:
            self._preloaded.clear()

    def _before_execute(self, conn: Connection, *args: Any, **kwargs: Any) -> None:
        # before the parameters are bound: keys unwrapped from here on are this statement's
        conn.info[_MISSES_BEFORE] = self.store.cache.misses

    def _after_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        compiled = getattr(context, "compiled", None)
        if compiled is None:
            return
        found = self._series.get(compiled)
        if found is None:
            found = self._series[compiled] = (
                statement_series(compiled),
                result_series(compiled),
            )
        used, results = found
        if used:
            self._count(results, conn.info.get(_MISSES_BEFORE))
        if self.is_async and results:
            self._preload(conn, results)

    def _count(self, results: frozenset[KeySeries], misses_before: int | None) -> None:
        """A hit: no key was unwrapped while its parameters were bound, and its result
        columns' keys are in memory (their rows are decoded after this)."""
        bound_from_memory = misses_before == self.store.cache.misses
        held = all(
            (keys := self.store.fresh(series)) is not None and keys.by_header
            for series in results
        )
        with self._guard:
            self.statements += 1
            if bound_from_memory and held:
                self.hits += 1

    def _preload(self, conn: Connection, needed: frozenset[KeySeries]) -> None:
        now = time.monotonic()
        for series in needed:
            if now >= self._preloaded.get(series, 0.0) or self.store.fresh(series) is None:
                self.loader.preload(series)
                with self._guard:
                    self._preloaded[series] = now + self.refresh_interval
                    if len(self._preloaded) > 2 * self.store.cache.max_entries:
                        self._preloaded.clear()  # bookkeeping stays bounded
        # keys made inside this connection's transaction (SQLite) are not in the key
        # table for other connections yet: readable here, dropped if it rolls back
        for key, cipher in self.connections.pending_items(conn).items():
            if isinstance(key, tuple) and isinstance(key[0], KeySeries) and key[0] in needed:
                self.store.put(key[0], cipher)
