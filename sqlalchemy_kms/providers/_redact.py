"""A logging filter that keeps KMS plaintext (data keys) out of botocore's DEBUG logs.

At ``DEBUG``, botocore logs every request it sends and every response body
it reads. For KMS those bodies hold data keys in the clear: the
``Plaintext`` member of the ``GenerateDataKey`` and ``Decrypt`` responses
and of the ``Encrypt`` request (a rewrap from a local master key). Of
botocore's loggers, two log bodies:

* ``botocore.endpoint``: ``"Making request for %s with params: %s"``, the
  request dictionary, whose ``body`` is the serialized request (JSON bytes
  for KMS; a dictionary of form fields for query protocols);
* ``botocore.parsers``: ``"Response body:\\n%r"``, the raw response bytes.

The others (``botocore.hooks``, ``botocore.auth``, ``botocore.retries``,
``botocore.httpchecksum``, ``urllib3``) log event and handler names,
signatures over a hash of the body, retry decisions and status lines,
never a body.

:class:`KmsPlaintextFilter` replaces the value of every ``Plaintext`` (and
``PrivateKeyPlaintext``) member with ``<redacted>``, whether the record
carries it in ``msg`` or ``args``, as a dictionary, JSON bytes or a string,
and leaves everything else as it was. It never raises: a record it cannot
check is replaced by a fixed message, and where a ``Plaintext`` member's
value cannot be told apart, everything after its name is redacted.
:func:`install` adds it to those loggers once; :class:`~sqlalchemy_kms.AwsKms`
calls it.

Example::

    >>> import logging
    >>> record = logging.LogRecord(
    ...     "botocore.parsers", logging.DEBUG, __file__, 1, "Response body:\\n%r",
    ...     (b'{"KeyId": "k", "Plaintext": "c2VjcmV0"}',), None)
    >>> KmsPlaintextFilter().filter(record)
    True
    >>> print(record.getMessage())
    Response body:
    b'{"KeyId": "k", "Plaintext": "<redacted>"}'
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = ["LOGGERS", "REDACTED", "KmsPlaintextFilter", "install", "redact"]

#: The loggers that log KMS request and response bodies.
LOGGERS = ("botocore.endpoint", "botocore.parsers")

#: What a redacted value reads as.
REDACTED = "<redacted>"

#: The members that hold plaintext: data keys and decrypted values.
_FIELDS = frozenset({"Plaintext", "PrivateKeyPlaintext"})

_NAME = r"""\\?(?P<quote>["'])(?:PrivateKey)?Plaintext\\?(?P=quote)\s*:\s*"""
_VALUE = r"""(?:"(?:[^"\\]|\\.)*"|b?'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")"""
_MARK = f'"{REDACTED}"'
# a value already redacted: as JSON, or as the repr of the string or bytes put in a dict
_DONE = f"""(?:b?"{REDACTED}"|b?'{REDACTED}')"""
# a member with a value we can read: redact the value
_MEMBER = re.compile(f"({_NAME})(?!{_DONE}){_VALUE}")
_MEMBER_BYTES = re.compile(_MEMBER.pattern.encode())
# a member left whose value is not redacted (escaped, cut short, not a string): the rest goes
_LEFT = re.compile(f"({_NAME})(?!\\s*{_DONE})[\\s\\S]*")
_LEFT_BYTES = re.compile(_LEFT.pattern.encode())
_KEY_BYTES = b"Plaintext"

_MAX_DEPTH = 32


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` with the value of every ``Plaintext`` member redacted.

    Strings and bytes are searched for JSON (or Python ``repr``) members;
    dictionaries, lists and tuples are copied with their ``Plaintext`` keys'
    values redacted and their other items redacted in turn. Anything else,
    and anything with no ``Plaintext`` in it, is returned as it is (the same
    object, so the caller can tell nothing changed).
    """
    if depth > _MAX_DEPTH:
        raise ValueError("too deeply nested to check")
    if isinstance(value, str):
        if "Plaintext" not in value:
            return value
        text = _MEMBER.sub(lambda m: m.group(1) + _MARK, value)
        return _LEFT.sub(lambda m: m.group(1) + _MARK, text)
    if isinstance(value, (bytes, bytearray)):
        if _KEY_BYTES not in value:
            return value
        mark = _MARK.encode()
        data = _MEMBER_BYTES.sub(lambda m: m.group(1) + mark, bytes(value))
        return _LEFT_BYTES.sub(lambda m: m.group(1) + mark, data)
    if isinstance(value, dict):
        items = {
            key: (_mark_like(item) if key in _FIELDS else redact(item, depth + 1))
            for key, item in value.items()
        }
        changed = any(items[key] is not item for key, item in value.items())
        return items if changed else value
    if type(value) in (list, tuple):
        redacted = [redact(item, depth + 1) for item in value]
        if all(new is old for new, old in zip(redacted, value, strict=True)):
            return value
        return type(value)(redacted)
    return value


def _mark_like(value: Any) -> Any:
    return REDACTED.encode() if isinstance(value, (bytes, bytearray)) else REDACTED


class KmsPlaintextFilter(logging.Filter):
    """Redacts KMS ``Plaintext`` members in a record's ``msg`` and ``args``.

    Dictionaries and bytes among the arguments are replaced by redacted
    copies (the objects botocore is using are never changed). Arguments of
    other types (botocore's request objects) are checked in the formatted
    message: if a ``Plaintext`` member is still there, the record's message
    becomes the formatted, redacted text. Never raises, never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        try:
            record.msg = redact(record.msg)
            if record.args:
                record.args = redact(record.args)
            message = record.getMessage()
            if "Plaintext" in message:
                safe = redact(message)
                if safe != message:
                    record.msg, record.args = safe, ()
        except Exception:  # on any doubt, nothing of the record is kept
            try:
                record.msg = "log record withheld: it could not be checked for KMS plaintext"
                record.args = ()
            except Exception:
                return False
        return True


_lock = threading.Lock()


def install() -> None:
    """Add a :class:`KmsPlaintextFilter` to each of :data:`LOGGERS` that has none."""
    with _lock:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(existing, KmsPlaintextFilter) for existing in logger.filters):
                logger.addFilter(KmsPlaintextFilter())
