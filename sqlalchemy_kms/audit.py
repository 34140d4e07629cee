"""The audit trail: structured events through the standard ``logging`` module.

Two loggers, both at ``INFO`` for successes and ``WARNING`` for failures:

* ``sqlalchemy_kms.audit.kms``: every call to the key provider
  (``GenerateDataKey``, ``Decrypt``, ``ReEncrypt``, ``Encrypt``);
* ``sqlalchemy_kms.audit.keys``: every change to the key table
  (``create``, ``rotate``, ``retire``, ``destroy``, ``rewrap``, ``import``).

Each record's message is one line of ``key=value`` pairs, and the same fields
are attached as ``record.sqlalchemy_kms`` (a dict) for structured handlers:
``event``, ``operation``, ``table``, ``purpose``, ``key_version``,
``master_key_id``, ``outcome`` (``ok`` or the error class name) and
``duration_ms``. Events never carry keys, wrapped keys or plaintext.

Example::

    >>> import logging
    >>> logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    >>> key_event("rotate", "patients", "data", 2, "local:abc")  # doctest: +SKIP
    sqlalchemy_kms.audit.keys event=key_change operation=rotate table=patients ...
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["KEYS_LOGGER", "KMS_LOGGER", "key_event", "kms_call"]

# a library's records go where the application's logging sends them, and nowhere else
logging.getLogger("sqlalchemy_kms").addHandler(logging.NullHandler())

KMS_LOGGER = logging.getLogger("sqlalchemy_kms.audit.kms")
KEYS_LOGGER = logging.getLogger("sqlalchemy_kms.audit.keys")

T = TypeVar("T")


def _emit(logger: logging.Logger, fields: dict[str, Any]) -> None:
    level = logging.INFO if fields.get("outcome") == "ok" else logging.WARNING
    if logger.isEnabledFor(level):
        message = " ".join(f"{name}={value}" for name, value in fields.items())
        logger.log(level, message, extra={"sqlalchemy_kms": fields})


def kms_call(
    operation: str,
    context: Mapping[str, str],
    master_key_id: str,
    call: Callable[[], T],
) -> T:
    """Run one provider call and record it (outcome and duration)."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        return call()
    except Exception as error:
        outcome = type(error).__name__
        raise
    finally:
        _emit(
            KMS_LOGGER,
            {
                "event": "kms_call",
                "operation": operation,
                "table": context.get("table"),
                "purpose": context.get("purpose", "data"),
                "key_version": context.get("key_version"),
                "master_key_id": master_key_id,
                "outcome": outcome,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )


def key_event(
    operation: str,
    table: str,
    purpose: str,
    key_version: int,
    master_key_id: str,
    outcome: str = "ok",
    duration_ms: float = 0.0,
) -> None:
    """Record one change of the key table."""
    _emit(
        KEYS_LOGGER,
        {
            "event": "key_change",
            "operation": operation,
            "table": table,
            "purpose": purpose,
            "key_version": key_version,
            "master_key_id": master_key_id,
            "outcome": outcome,
            "duration_ms": round(duration_ms, 3),
        },
    )
