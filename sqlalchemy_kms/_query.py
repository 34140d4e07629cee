"""What an encrypted column answers in SQL: equality on deterministic columns, nothing else.

:class:`EncryptedComparator` is the ``comparator_factory`` of
:class:`~sqlalchemy_kms.KMSEncrypted`. It lets through what encryption can
answer (``IS NULL`` tests; on deterministic columns ``==``, ``!=``,
``in_()`` and ``not_in()`` with Python values) and refuses everything else
with :class:`~sqlalchemy_kms.errors.UnsupportedQueryError` when the
expression is built.

Equality on a deterministic column has to match the value under every
enabled search key version, and a cached statement must stay right after a
rotation. ``col == v`` is therefore one bound parameter (one element of the
statement's cache key) that the SQL renders once per possible key version:
``col IN (:v_1, :v_2, :v_3, :v_4)``. Each rendering has its own
:class:`SearchTerm` type, which fills it when the statement runs with ``v``
under the enabled search key of its slot, newest first (a slot with no key
matches nothing). The SQL is fixed, so no list is expanded per execution.
``in_()`` binds one expanding list of ``(value, slot)`` pairs.

The comparator only sees expressions whose left operand is encrypted
(``column == literal(v)`` is ``column == v``). The other shapes
(``plain_column == encrypted_column``, ``plain.in_(select(encrypted_column))``,
a join on an encrypted column, ``literal(v) == column``) are checked when a
binary expression is compiled, which happens once per cached statement, not
per execution: an encrypted operand met by anything but a Python value
raises :class:`~sqlalchemy_kms.errors.UnsupportedQueryError` before the
statement reaches the database. Relationships over encrypted columns are
refused when the mappers are configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import bindparam, event
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    ClauseList,
    ColumnElement,
    False_,
    Grouping,
    Null,
    True_,
)
from sqlalchemy.sql.selectable import ScalarSelect, SelectBase
from sqlalchemy.sql.visitors import InternalTraversal

from ._format import column_aad
from ._keytable import KeySeries
from .errors import (
    ConfigurationError,
    EncryptionError,
    SQLAlchemyKMSError,
    UnsupportedQueryError,
)

__all__ = [
    "PRIMARY_KEY_REASON",
    "RELATIONSHIP_HINT",
    "SEARCH_SLOTS",
    "Binding",
    "EncryptedComparator",
    "SearchTerm",
    "concealed",
    "converted",
    "with_context",
]

#: The attribute of an engine's dialect that holds its vault.
VAULT_ATTR = "_sqlalchemy_kms_vault"


#: Key versions of one search key an equality query can match at once. Each
#: ``==``/``in_()`` on a deterministic column binds this many values per
#: operand, one for each enabled search key version (unused ones match nothing).
SEARCH_SLOTS = 4

_EQUALITY = {operators.eq: False, operators.ne: True}
_MEMBERSHIP = {operators.in_op: False, operators.not_in_op: True}
_NULL_TESTS = {operators.is_, operators.is_not}
_NEVER_STORED = b""  # no stored value is empty: matches nothing, even under NOT IN
_BOOLEAN = sqltypes.Boolean()

_RANDOMIZED_HINT = (
    "Only IS NULL / IS NOT NULL work on a randomized column; for equality use "
    "KMSEncrypted(..., deterministic=True). Ranges, patterns and ordering cannot work on "
    "encrypted columns."
)
_DETERMINISTIC_HINT = (
    "Deterministic columns support ==, !=, in_(), not_in(), is_(None) and is_not(None) with "
    "Python values. Ranges, patterns, ordering and comparisons with other columns cannot work "
    "on encrypted columns."
)


_COLUMN_COMPARISON_HINT = (
    "An encrypted column can be compared only with Python values (column == value, "
    "column.in_([...])): each column is encrypted under its own key, so comparing it with "
    "another column or a subquery, or joining on it, never matches. Join on a plaintext key "
    "such as the primary key instead."
)
RELATIONSHIP_HINT = (
    "A relationship or foreign key compares this column with another column, which never "
    "matches: each column is encrypted under its own key. Relate the tables through a "
    "plaintext key such as the primary key."
)
PRIMARY_KEY_REASON = (
    "the ORM finds, updates and deletes rows by primary key value, which an encrypted "
    "column cannot answer; use a plaintext key (an integer or UUID id) and make the "
    "encrypted value a unique deterministic column"
)
_LITERAL_LEFT_HINT = (
    "Put the encrypted column on the left: column == value (or value == column with a "
    "Python value); literal(value) on the left of a comparison is refused."
)

# what ``literal(v)`` is when it is not a literal
_NOT_A_LITERAL: Any = object()


def _is_sql_expression(value: Any) -> bool:
    return isinstance(value, (ColumnElement, operators.ColumnOperators)) or hasattr(
        value, "__clause_element__"
    )


def _literal_value(operand: Any) -> Any:
    """The Python value of ``literal(v)`` (an anonymous bound value), else
    :data:`_NOT_A_LITERAL`: a named parameter is filled when the statement
    runs, which a search term cannot follow."""
    if (
        isinstance(operand, BindParameter)
        and operand.unique
        and not operand.required
        and operand.callable is None
        and not operand.expanding
        and not operand.literal_execute
        and not isinstance(operand.type, SearchTerm)
    ):
        return operand.value
    return _NOT_A_LITERAL


def is_encrypted_type(type_: Any) -> bool:
    """Whether ``type_`` is a :class:`~sqlalchemy_kms.KMSEncrypted` column type."""
    factory = getattr(type_, "comparator_factory", None)
    return isinstance(factory, type) and issubclass(factory, EncryptedComparator)


def _encrypted_type(operand: Any) -> Any:
    """The first encrypted column type an operand carries: its own, a tuple member's, a
    grouped list's or a subquery's selected column's; ``None`` if none."""
    operand_type = getattr(operand, "type", None)
    if is_encrypted_type(operand_type):
        return operand_type
    if isinstance(operand_type, sqltypes.TupleType):
        for member in operand_type.types:
            if is_encrypted_type(member):
                return member
    if isinstance(operand, Grouping):
        return _encrypted_type(operand.element)
    if isinstance(operand, ClauseList):
        return next(filter(None, map(_encrypted_type, operand.clauses)), None)
    if isinstance(operand, ScalarSelect):
        operand = operand.element
    if isinstance(operand, SelectBase):
        return next(filter(None, map(_encrypted_type, operand.selected_columns)), None)
    return None


def _unsupported(column_type: Any, op: Any, hint: str) -> UnsupportedQueryError:
    binding = column_type._binding
    column = column_type._column
    return UnsupportedQueryError(
        hint,
        operator=_operator_name(op),
        table=binding.scope if binding else None,
        column=binding.column if binding else getattr(column, "name", None),
    )


def _refuse_or_render_binary(
    render: Callable[..., str],
) -> Callable[..., str]:
    """The compile step of every binary expression: encrypted operands are checked, the
    rest is rendered by ``render`` (SQLAlchemy's own step, or one registered earlier)."""

    def check(element: BinaryExpression[Any], compiler: Any, **kw: Any) -> str:
        left: Any = element.left
        right: Any = element.right
        op = element.operator
        left_type: Any = _encrypted_type(left)
        right_type: Any = _encrypted_type(right)
        if left_type is None and right_type is None:
            return render(element, compiler, **kw)
        if op in _NULL_TESTS and isinstance(right, (Null, True_, False_)):
            return render(element, compiler, **kw)
        if left_type is None and _literal_value(left) is not _NOT_A_LITERAL:
            # literal(v) <op> column: the ORM would evaluate literal(v) == column in Python
            # against the objects' values (synchronize_session), so it is not answered at all
            hint = _DETERMINISTIC_HINT if right_type.deterministic else _RANDOMIZED_HINT
            raise _unsupported(right_type, op, f"{_LITERAL_LEFT_HINT} {hint}")
        column_type = left_type if left_type is not None else right_type
        raise _unsupported(column_type, op, _COLUMN_COMPARISON_HINT)

    return check


def _install_binary_check() -> None:
    dispatcher = BinaryExpression.__dict__.get("_compiler_dispatcher")
    render = (
        dispatcher.specs["default"]
        if dispatcher is not None and "default" in dispatcher.specs
        else BinaryExpression._compiler_dispatch
    )
    compiles(BinaryExpression)(_refuse_or_render_binary(render))


def _operator_name(op: Any) -> str:
    name = str(getattr(op, "__name__", op))
    return name.removesuffix("_op")


class Binding:
    """Where a column lives: its key scope, name, associated data and key series."""

    __slots__ = ("aad", "column", "scope", "series")

    def __init__(self, scope: str, column: str, deterministic: bool) -> None:
        self.scope = scope
        self.column = column
        self.aad = column_aad(scope, column)
        self.series = KeySeries(scope, deterministic)


def with_context(error: SQLAlchemyKMSError, binding: Binding | None) -> SQLAlchemyKMSError:
    if binding is not None:
        error.table = error.table or binding.scope
        error.column = error.column or binding.column
        error.args = (error._render(),)
    return error


def concealed(error: SQLAlchemyKMSError) -> SQLAlchemyKMSError:
    """``error`` cut from the exceptions it was raised while handling: those may hold
    the value (a ``UnicodeEncodeError`` holds the whole string)."""
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error


class _Converted:
    """Context manager raising every exception but ours as ``EncryptionError`` from None,
    named by its type alone: its message or attributes may hold the value."""

    __slots__ = ("source",)

    def __init__(self, source: str | None) -> None:
        self.source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if not isinstance(error, Exception) or isinstance(error, SQLAlchemyKMSError):
            return
        name = type(error).__name__
        if self.source is not None:
            reason = (
                f"{self.source} raised {name} (its message is not shown: it may hold the value)"
            )
        elif isinstance(error, UnicodeError):
            reason = "the string holds a character UTF-8 cannot encode (a lone surrogate)"
        elif isinstance(error, RecursionError):
            reason = "the value is nested too deeply to encode"
        else:
            reason = f"the value cannot be encoded ({name})"
        raise EncryptionError(reason) from None


def converted(source: str | None = None) -> _Converted:
    """A ``with`` block whose exceptions, other than ours, become ``EncryptionError``;
    ``source`` names the user's function the block calls, if any."""
    return _Converted(source)


class EncryptedComparator(sqltypes.TypeDecorator.Comparator[Any]):
    """Lets through what encryption can answer and refuses the rest when built."""

    __slots__ = ()

    def _refuse(self, op: Any, hint: str | None = None) -> UnsupportedQueryError:
        column_type: Any = self.type
        binding = column_type._binding
        if hint is None:
            hint = _DETERMINISTIC_HINT if column_type.deterministic else _RANDOMIZED_HINT
        return UnsupportedQueryError(
            hint,
            operator=_operator_name(op),
            table=binding.scope if binding else None,
            column=binding.column if binding else getattr(self.expr, "key", None),
        )

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> ColumnElement[Any]:
        column_type: Any = self.type
        if op in _NULL_TESTS or (op in _EQUALITY and other and other[0] is None):
            return super().operate(op, *other, **kwargs)
        if op in _EQUALITY and _is_sql_expression(other[0]):
            value = _literal_value(other[0])
            if value is _NOT_A_LITERAL:
                # Built, because SQLAlchemy itself compares columns with == (and only
                # asks the result for truth); refused when compiled into SQL.
                return super().operate(op, *other, **kwargs)
            other = (value,)  # literal(v): the same as v
        if column_type.deterministic:
            if op in _EQUALITY:
                return self._match(op, [other[0]], negate=_EQUALITY[op])
            if op in _MEMBERSHIP:
                return self._match(op, other[0], negate=_MEMBERSHIP[op])
            if op is operators.distinct_op:
                return super().operate(op, *other, **kwargs)
        raise self._refuse(op)

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> ColumnElement[Any]:
        raise self._refuse(op)

    def _match(self, op: Any, values: Any, *, negate: bool) -> ColumnElement[Any]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise self._refuse(
                op,
                "On a deterministic column in_() takes a list of Python values, "
                "not a subquery or a string.",
            )
        values = [_literal_value(value) if _is_sql_expression(value) else value for value in values]
        if any(value is _NOT_A_LITERAL for value in values):
            raise self._refuse(op, _COLUMN_COMPARISON_HINT)
        column_type: Any = self.type
        term_type = column_type._search_term
        if op in _EQUALITY:
            return _SearchMatch(self.expr, values[0], term_type, negate=negate)
        return _SearchIn(self.expr, values, term_type, negate=negate)


class _SearchMatch(ColumnElement[bool]):
    """``column IN (...)`` (``NOT IN`` when negated) of one value, one parameter
    rendered once per slot.

    The statement's cache key holds the one parameter; each rendering is a
    clone of it with the :class:`SearchTerm` of its slot, so a cached
    statement run with another value fills every slot from that value.
    """

    __visit_name__ = "search_match"
    inherit_cache = True
    _is_implicitly_boolean = True
    type = _BOOLEAN

    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy declares it so)
        ("column", InternalTraversal.dp_clauseelement),
        ("term", InternalTraversal.dp_clauseelement),
        ("negate", InternalTraversal.dp_boolean),
    ]

    def __init__(self, column: Any, value: Any, term_type: SearchTerm, *, negate: bool) -> None:
        self.column = column
        self.term = BindParameter(getattr(column, "key", None), value, type_=term_type, unique=True)
        self.negate = negate

    def _negate(self) -> ColumnElement[Any]:
        negated = self._clone()
        negated.negate = not self.negate
        return negated


class _SearchIn(_SearchMatch):
    """``column IN (...)`` (``NOT IN`` when negated) of a list of values: one expanding
    parameter of ``(value, slot)`` pairs.

    Its own element rather than a binary expression, so that the ORM's
    ``synchronize_session="evaluate"`` cannot compare those pairs with the
    objects' plaintext and must say it cannot evaluate the criteria.
    """

    inherit_cache = True

    def __init__(
        self, column: Any, values: list[Any], term_type: SearchTerm, *, negate: bool
    ) -> None:
        self.column = column
        terms = [(value, slot) for value in values for slot in range(term_type.slots)]
        self.term = bindparam(None, terms, type_=term_type, expanding=True, unique=True)
        self.negate = negate


@compiles(_SearchIn)
def _render_search_in(element: _SearchIn, compiler: Any, **kw: Any) -> str:
    term: Any = element.term._clone(maintain_key=True)
    # an empty list renders as a condition that is false (IN) or true (NOT IN)
    term.expand_op = operators.not_in_op if element.negate else operators.in_op
    membership = "NOT IN" if element.negate else "IN"
    return f"({compiler.process(element.column, **kw)} {membership} {compiler.process(term, **kw)})"


@compiles(_SearchMatch)
def _render_search_match(element: _SearchMatch, compiler: Any, **kw: Any) -> str:
    term = element.term
    term_type: SearchTerm = term.type  # type: ignore[assignment]
    slots = []
    for slot in range(term_type.slots):
        rendering = term._clone()  # a new name, the same value; known as the term's clone
        rendering.type = term_type.for_slot(slot)
        slots.append(compiler.process(rendering, **kw))
    membership = "NOT IN" if element.negate else "IN"
    return f"{compiler.process(element.column, **kw)} {membership} ({', '.join(slots)})"


class _PassThroughBinary(sqltypes.LargeBinary):
    """Binary that hands values to the driver untouched (bytes, or text for a not yet
    converted SQLite cell)."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None


def _plaintext_form(text: bytes, dialect: Dialect) -> Any:
    # an unconverted SQLite cell still holds TEXT; server columns hold the text's bytes
    return text.decode("utf-8") if dialect.name == "sqlite" else text


class SearchTerm(sqltypes.TypeDecorator[Any]):
    """Bind type of an equality operand of one deterministic column.

    The operand becomes its stored form under the enabled search key number
    ``slot``, newest first; a slot with no key gives a value no row holds,
    and slot :data:`SEARCH_SLOTS`, present while the column accepts
    plaintext, gives the value as the plaintext column stored it.

    With ``slot=None`` (the type of ``in_()`` lists) each value is a
    ``(value, slot)`` pair; with a slot (one rendering of ``==``) each value
    is the Python value itself.
    """

    impl = _PassThroughBinary
    cache_ok = True

    def __init__(self, column_type: Any, slot: int | None = None) -> None:
        self.column_type = column_type
        self.slot = slot
        super().__init__()

    @property
    def slots(self) -> int:
        """How many slots an operand of this column fills."""
        return SEARCH_SLOTS + (1 if self.column_type.accept_plaintext else 0)

    def for_slot(self, slot: int) -> SearchTerm:
        """The type of the renderings of slot ``slot`` (one object per slot, so its
        processor is built once per dialect)."""
        kept: dict[int, SearchTerm] = self.__dict__.setdefault("_slot_types", {})
        found = kept.get(slot)
        if found is None or found.column_type is not self.column_type:
            found = kept[slot] = SearchTerm(self.column_type, slot)
        return found

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        complete = self.process_bind_param
        column_type = self.column_type
        binding = column_type._binding
        fixed = self.slot
        if binding is None or column_type.normalize is not None:
            return lambda value: complete(value, dialect)
        if fixed is not None and fixed >= SEARCH_SLOTS:  # the plaintext slot
            return lambda value: complete(value, dialect)
        series, scope, column, aad = binding.series, binding.scope, binding.column, binding.aad
        encode = column_type._codec.encode

        def seal(plain: Any, slot: int) -> Any:
            """The stored form from held keys; ``None`` sends it to the complete path."""
            vault = getattr(dialect, VAULT_ATTR, None)
            if plain is not None and vault is not None and slot < SEARCH_SLOTS:
                keys = vault.keys.fresh(series)
                ciphers = keys.enabled if keys is not None else None
                if ciphers is not None and len(ciphers) <= SEARCH_SLOTS:
                    if slot >= len(ciphers):
                        return _NEVER_STORED
                    try:
                        return ciphers[slot].seal_deterministic(encode(plain), scope, column, aad)
                    except Exception:  # the complete path raises it as EncryptionError
                        pass
            return None

        if fixed is None:

            def process_pair(value: Any) -> Any:
                sealed = seal(*value)
                return complete(value, dialect) if sealed is None else sealed

            return process_pair

        def process(value: Any) -> Any:
            sealed = seal(value, fixed)
            return complete(value, dialect) if sealed is None else sealed

        return process

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        plain, slot = value if self.slot is None else (value, self.slot)
        if plain is None:
            return None
        column_type = self.column_type
        binding = column_type._binding
        try:
            vault = column_type._vault(dialect)
            assert binding is not None
            ciphers = vault.loader.enabled(binding.series)
            if len(ciphers) > SEARCH_SLOTS:
                raise UnsupportedQueryError(
                    f"{len(ciphers)} search key versions are enabled and equality can match at "
                    f"most {SEARCH_SLOTS} at once; finish re-encrypting the table and retire "
                    "old search key versions",
                    operator="eq",
                    table=binding.scope,
                    column=binding.column,
                )
            if slot == SEARCH_SLOTS:  # transition mode: the value as plaintext
                if column_type.normalize is not None:
                    with converted("normalize="):
                        plain = column_type.normalize(plain)
                with converted():
                    return _plaintext_form(column_type._codec.legacy_text(plain), dialect)
            if slot >= len(ciphers):
                return _NEVER_STORED
            plaintext = column_type._encode(plain)
            with converted():
                token: bytes = ciphers[slot].seal_deterministic(
                    plaintext, binding.scope, binding.column, binding.aad
                )
            return token
        except SQLAlchemyKMSError as error:
            failure = with_context(error, binding)
        raise concealed(failure) from None


def _refuse_encrypted_relationships(mapper: Mapper[Any], class_: type[Any]) -> None:
    """``mapper_configured``: a relationship joins on its columns, which an encrypted
    column cannot answer; an encrypted primary key cannot identify rows."""
    for column in mapper.primary_key:
        column_type: Any = column.type
        if is_encrypted_type(column_type):
            raise ConfigurationError(
                f"mapper {class_.__name__} uses an encrypted primary key: {PRIMARY_KEY_REASON}",
                table=column_type._binding.scope if column_type._binding else None,
                column=column.name,
            )
    for prop in mapper.relationships:
        pairs = [*prop.local_remote_pairs, *prop.synchronize_pairs]
        pairs += prop.secondary_synchronize_pairs or []
        for pair in pairs:
            for column in pair:
                if is_encrypted_type(column.type):
                    raise _unsupported(column.type, "relationship", RELATIONSHIP_HINT)


event.listen(Mapper, "mapper_configured", _refuse_encrypted_relationships)
_install_binary_check()
