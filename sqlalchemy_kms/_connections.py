"""Which connection a key operation runs on: its own, a migration's, or SQLite's writer.

Key-table work normally runs on a short connection of its own, committed
before any value is encrypted under a new key. Two cases must share the
application's connection instead:

* **A bound connection** (:meth:`Connections.using`), as in a migration: the
  migration's transaction may hold locks, or a key table it just created,
  that another connection could not see or would wait for.
* **SQLite's single writer.** When the application's SQLite transaction
  already holds the write lock, a second connection could not write a key
  row: the key is written on the application's connection, inside its
  transaction, and serves only that transaction until it commits (it is
  *pending* on that connection).

Example::

    >>> from sqlalchemy import create_engine, text
    >>> engine = create_engine("sqlite://")
    >>> connections = Connections(engine)
    >>> with engine.connect() as conn, connections.using(conn):
    ...     connections.shared() is conn
    True
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util.concurrency import in_greenlet

from .errors import ConfigurationError

__all__ = ["Connections", "database_work"]

_PENDING_INFO: Final = "sqlalchemy_kms.pending"

# The connection bound with Connections.using() in this thread/task.
_bound_connection: contextvars.ContextVar[weakref.ref[Connection] | None] = contextvars.ContextVar(
    "sqlalchemy_kms_bound_connection", default=None
)

# The connection whose statement is being executed in this thread/task (SQLite only).
_current_connection: contextvars.ContextVar[weakref.ref[Connection] | None] = (
    contextvars.ContextVar("sqlalchemy_kms_current_connection", default=None)
)


def _remember_connection(conn: Connection, *args: Any, **kwargs: Any) -> None:
    _current_connection.set(weakref.ref(conn))


class Connections:
    """The connections key-table work of one engine uses.

    :meth:`listen` installs the engine events it needs; :meth:`close` removes them.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        on_commit: Callable[[dict[Any, Any]], object] | None = None,
        on_rollback: Callable[[dict[Any, Any]], object] | None = None,
    ) -> None:
        self.engine = engine
        self.shares_writer = engine.dialect.name == "sqlite"
        self.is_async = bool(engine.dialect.is_async)
        self._on_commit = on_commit
        self._on_rollback = on_rollback

    def __repr__(self) -> str:
        return f"<Connections {self.engine.dialect.name}>"

    def listen(self) -> None:
        """Install the engine events: the current connection (SQLite) and the end of
        each transaction, which drops the keys pending on it."""
        if self.shares_writer:
            event.listen(self.engine, "before_execute", _remember_connection)
        event.listen(self.engine, "commit", self._committed)
        event.listen(self.engine, "rollback", self._rolled_back)

    def _committed(self, conn: Connection) -> None:
        pending = conn.info.pop(_PENDING_INFO, None)
        if pending and self._on_commit is not None:
            self._on_commit(pending)  # keys that now exist for everyone

    def _rolled_back(self, conn: Connection) -> None:
        pending = conn.info.pop(_PENDING_INFO, None)
        if pending and self._on_rollback is not None:
            self._on_rollback(pending)  # keys that never existed: let go of them

    def close(self) -> None:
        """Remove the engine events :meth:`listen` installed."""
        for name, listener in (
            ("before_execute", _remember_connection),
            ("commit", self._committed),
            ("rollback", self._rolled_back),
        ):
            if event.contains(self.engine, name, listener):
                event.remove(self.engine, name, listener)

    @contextmanager
    def using(self, connection: Connection) -> Iterator[Connection]:
        """Run key-table work of this thread or task on ``connection`` inside the block.

        Refuses (:class:`~sqlalchemy_kms.errors.ConfigurationError`) a connection that
        is closed or of another engine: key work would silently go elsewhere.
        """
        if connection.closed or connection.dialect is not self.engine.dialect:
            raise ConfigurationError(
                "the KeyVault cannot share this connection (it is closed, or belongs to "
                "another engine); create the KeyVault on the engine the connection is of"
            )
        token = _bound_connection.set(weakref.ref(connection))
        try:
            yield connection
        finally:
            _bound_connection.reset(token)

    def shared(self) -> Connection | None:
        """The connection key-table work must share: one bound with :meth:`using`, or,
        on SQLite, the application's connection when it already holds a write lock."""
        bound_ref = _bound_connection.get()
        bound = bound_ref() if bound_ref is not None else None
        if bound is not None and not bound.closed and bound.dialect is self.engine.dialect:
            return bound
        if not self.shares_writer:
            return None
        ref = _current_connection.get()
        conn = ref() if ref is not None else None
        if conn is None or conn.dialect is not self.engine.dialect or conn.closed:
            return None
        if not conn.in_transaction():
            return None
        # the driver's own connection (sqlite3 or aiosqlite) knows whether it holds a lock
        if not getattr(conn.connection.driver_connection, "in_transaction", False):
            return None
        return conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection to read the key table: the shared one, or a new one."""
        shared = self.shared()
        if shared is not None:
            yield shared
            return
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A connection for a key-table change: the shared one, or a transaction of our own."""
        shared = self.shared()
        if shared is not None:
            yield shared
            return
        with self.engine.begin() as conn:
            yield conn

    @staticmethod
    def pending(conn: Connection) -> dict[Any, Any]:
        """Keys made inside ``conn``'s open transaction, usable by it only until it ends."""
        pending: dict[Any, Any] = conn.info.setdefault(_PENDING_INFO, {})
        return pending

    @staticmethod
    def pending_items(conn: Connection) -> dict[Any, Any]:
        """The keys pending on ``conn`` (empty if none), without creating the mapping."""
        found: dict[Any, Any] = conn.info.get(_PENDING_INFO, {})
        return found


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="_UsesConnections")


class _UsesConnections(Protocol):
    connections: Connections


def database_work(
    method: Callable[Concatenate[S, P], R],
) -> Callable[Concatenate[S, P], R]:
    """Refuse, with a clear error, a vault method that reads or writes the database
    when it is called on an async engine outside ``run_sync`` (where it could only
    fail with SQLAlchemy's ``MissingGreenlet`` and leave a coroutine never awaited)."""

    @functools.wraps(method)
    def checked(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.connections.is_async and not in_greenlet():
            raise ConfigurationError(
                f"vault.{method.__name__}() uses the database of an async engine: call it "
                "inside run_sync, e.g. async with engine.begin() as conn: await "
                f"conn.run_sync(lambda _: vault.{method.__name__}(...))"
            )
        return method(self, *args, **kwargs)

    return checked
