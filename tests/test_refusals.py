"""What cannot work is refused before anything runs.

Comparisons an encrypted column cannot answer raise ``UnsupportedQueryError``
whichever side the column is on (when the statement is compiled, before it
reaches the database); relationships over encrypted columns raise when the
mappers are configured; definitions encryption cannot honour (an encrypted
primary key or foreign key, a unique constraint or index on a randomized
column, a value the database computes) raise ``ConfigurationError`` or
``UnsupportedQueryError`` when the table is defined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Computed,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    String,
    Table,
    UniqueConstraint,
    event,
    func,
    literal,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    foreign,
    mapped_column,
    relationship,
)

from sqlalchemy_kms import KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import ConfigurationError, UnsupportedQueryError

EMAIL = "kim@x.io"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(KMSEncrypted(String(100), deterministic=True))
    name: Mapped[str | None] = mapped_column(KMSEncrypted(String(100)))


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100))


@pytest.fixture
def people(engine: Engine, vault: KeyVault) -> Engine:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([User(id=1, email=EMAIL, name="Kim"), Customer(id=1, email=EMAIL)])
        session.commit()
    return engine


@pytest.fixture
def statements(people: Engine) -> Iterator[list[str]]:
    """The SQL statements sent to the database while the test runs."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(people, "before_cursor_execute", record)
    yield sent
    event.remove(people, "before_cursor_execute", record)


# Each of these returned wrong rows (or none) without an error.
REFUSED: dict[str, Callable[[], Any]] = {
    "join_plain_on_encrypted": lambda: select(User.id, Customer.id).join(
        Customer, Customer.email == User.email
    ),
    "join_encrypted_on_plain": lambda: select(User.id, Customer.id).join(
        Customer, User.email == Customer.email
    ),
    "in_subquery_of_encrypted": lambda: select(Customer.id).where(
        Customer.email.in_(select(User.email))
    ),
    "eq_scalar_subquery_of_encrypted": lambda: select(Customer.id).where(
        Customer.email == select(User.email).where(User.id == 1).scalar_subquery()
    ),
    "plain_lt_encrypted": lambda: select(Customer.id).where(Customer.email < User.email),
    "plain_ne_encrypted": lambda: select(Customer.id).where(Customer.email != User.email),
    "plain_in_list_of_encrypted": lambda: select(Customer.id).where(
        Customer.email.in_([User.email])
    ),
    "tuple_with_encrypted_in_values": lambda: select(User.id).where(
        tuple_(User.email, User.id).in_([(EMAIL, 1)])
    ),
    "literal_eq_deterministic": lambda: select(User.id).where(literal(EMAIL) == User.email),
    "literal_ne_deterministic": lambda: select(User.id).where(literal(EMAIL) != User.email),
    "negated_literal_eq": lambda: select(User.id).where(~(literal(EMAIL) == User.email)),
    "literal_lt_deterministic": lambda: select(User.id).where(literal(EMAIL) < User.email),
    "literal_eq_randomized": lambda: select(User.id).where(literal("Kim") == User.name),
    "literal_in_subquery": lambda: select(User.id).where(literal(EMAIL).in_(select(User.email))),
    "correlated_exists": lambda: select(Customer.id).where(
        select(User.id).where(User.email == Customer.email).exists()
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_encrypted_operand_on_either_side_is_refused_before_execution(
    people: Engine, statements: list[str], name: str
) -> None:
    statement = REFUSED[name]()
    with Session(people) as session, pytest.raises(UnsupportedQueryError) as info:
        session.execute(statement).all()
    error = info.value
    assert error.table == "users" and error.column in ("email", "name")
    assert f"users.{error.column} is encrypted" in str(error)
    assert "Python value" in str(error) or "deterministic" in str(error).lower()
    assert EMAIL not in str(error)
    assert statements == []  # nothing reached the database


def test_the_check_runs_when_compiling_not_per_execution(
    people: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy_kms import _query

    looked_at: list[Any] = []
    original = _query._encrypted_type

    def counting(operand: Any) -> Any:
        looked_at.append(operand)
        return original(operand)

    monkeypatch.setattr(_query, "_encrypted_type", counting)
    statement = select(User.id).join(Customer, Customer.id == User.id).where(User.email == EMAIL)
    with people.connect() as conn:
        assert conn.execute(statement).scalars().all() == [1]
        compiled = len(looked_at)
        assert compiled > 0
        for _ in range(3):
            result = conn.execute(statement)
            assert result.scalars().all() == [1]
            assert result.context.cache_hit.name == "CACHE_HIT"
    assert len(looked_at) == compiled


def test_the_orm_still_compares_columns_in_python(people: Engine) -> None:
    # SQLAlchemy uses == as a truth test between columns; that keeps working
    assert bool(User.email == User.email)
    assert not bool(User.email == Customer.email)
    with Session(people) as session:
        user = session.get(User, 1)
        assert user is not None and user.email == EMAIL
        assert session.scalars(select(User.id).where(User.email.is_not(None))).all() == [1]


def test_a_literal_on_the_right_is_a_python_value(people: Engine) -> None:
    with Session(people) as session:
        assert session.scalars(select(User.id).where(User.email == literal(EMAIL))).all() == [1]
        assert session.scalars(select(User.id).where(User.email != literal(EMAIL))).all() == []
        found = session.scalars(select(User.id).where(User.email.in_([literal(EMAIL)])))
        assert found.all() == [1]


# -- relationships -----------------------------------------------------------------


def test_foreign_key_over_an_encrypted_column_is_refused_at_definition() -> None:
    class Local(DeclarativeBase):
        pass

    class Owner(Local):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(
            KMSEncrypted(String(100), deterministic=True), unique=True
        )

    with pytest.raises(UnsupportedQueryError, match="foreign key") as info:

        class Pet(Local):
            __tablename__ = "pets"
            id: Mapped[int] = mapped_column(primary_key=True)
            owner_email: Mapped[str] = mapped_column(
                KMSEncrypted(String(100), deterministic=True), ForeignKey("owners.email")
            )
            owner = relationship(Owner, backref="pets")

    assert (info.value.table, info.value.column) == ("pets", "owner_email")
    Local.registry.dispose()


def test_plain_foreign_key_to_an_encrypted_column_is_refused_at_definition() -> None:
    metadata = MetaData()
    Table(
        "owners",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("email", KMSEncrypted(String(100), deterministic=True), unique=True),
    )
    with pytest.raises(UnsupportedQueryError, match="primary key") as info:
        Table(
            "pets",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("owner_email", String(100), ForeignKey("owners.email")),
        )
    assert (info.value.table, info.value.column) == ("owners", "email")
    assert "pets" not in metadata.tables


def test_relationship_over_an_encrypted_column_is_refused_at_mapper_configuration() -> None:
    class Local(DeclarativeBase):
        pass

    class Owner(Local):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(
            KMSEncrypted(String(100), deterministic=True), unique=True
        )
        pets = relationship(
            "Pet", primaryjoin=lambda: Owner.email == foreign(Pet.owner_email), viewonly=True
        )

    class Pet(Local):
        __tablename__ = "pets"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_email: Mapped[str] = mapped_column(KMSEncrypted(String(100), deterministic=True))

    try:
        with pytest.raises(UnsupportedQueryError, match="relationship") as info:
            configure_mappers()
        assert info.value.table in ("owners", "pets")
        assert info.value.column in ("email", "owner_email")
    finally:
        Local.registry.dispose()


def test_relationships_over_plaintext_keys_keep_working(engine: Engine, vault: KeyVault) -> None:
    class Local(DeclarativeBase):
        pass

    class Owner(Local):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        email: Mapped[str] = mapped_column(
            KMSEncrypted(String(100), deterministic=True), unique=True
        )
        pets: Mapped[list[Pet]] = relationship(back_populates="owner")

    class Pet(Local):
        __tablename__ = "pets"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
        name: Mapped[str] = mapped_column(KMSEncrypted(String(100)))
        owner: Mapped[Owner] = relationship(back_populates="pets")

    try:
        Local.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(Owner(id=1, email=EMAIL, pets=[Pet(id=1, name="Rex")]))
            session.commit()
        with Session(engine) as session:
            owner = session.scalars(select(Owner).where(Owner.email == EMAIL)).one()
            assert [pet.name for pet in owner.pets] == ["Rex"]
            pet = session.get(Pet, 1)
            assert pet is not None and pet.owner.email == EMAIL
    finally:
        Local.registry.dispose()


# -- definitions ---------------------------------------------------------------------


def _randomized() -> KMSEncrypted:
    return KMSEncrypted(String(100))


def _deterministic() -> KMSEncrypted:
    return KMSEncrypted(String(100), deterministic=True)


def _with(*items: Any) -> Callable[[], Table]:
    return lambda: Table("accounts", MetaData(), Column("id", Integer, primary_key=True), *items)


def _index_added_later() -> Table:
    table = _with(Column("secret", _randomized()))()
    Index("ix_accounts_secret", table.c.secret)
    return table


def _unique_constraint_added_later() -> Table:
    table = _with(Column("secret", _randomized()))()
    table.append_constraint(UniqueConstraint("secret"))
    return table


def _expression_index() -> Table:
    table = _with(Column("secret", _deterministic()))()
    Index("ix_accounts_lower_secret", func.lower(table.c.secret))
    return table


def _appended_column() -> Table:
    table = _with()()
    table.append_column(Column("secret", _randomized(), unique=True))
    return table


REFUSED_DEFINITIONS: dict[str, tuple[Callable[[], Any], str]] = {
    "unique_randomized": (_with(Column("secret", _randomized(), unique=True)), "unique"),
    "index_randomized": (_with(Column("secret", _randomized(), index=True)), "index"),
    "unique_constraint_randomized": (
        _with(Column("secret", _randomized()), UniqueConstraint("secret")),
        "unique",
    ),
    "composite_unique_with_randomized": (
        _with(
            Column("code", String(10)),
            Column("secret", _randomized()),
            UniqueConstraint("code", "secret"),
        ),
        "unique",
    ),
    "index_in_table_args_randomized": (
        _with(Column("secret", _randomized()), Index("ix_secret", "secret")),
        "index",
    ),
    "index_added_later": (_index_added_later, "index"),
    "unique_constraint_added_later": (_unique_constraint_added_later, "unique"),
    "appended_column": (_appended_column, "unique"),
    "expression_index": (_expression_index, "expression"),
    "server_default": (_with(Column("secret", _randomized(), server_default="x")), "database"),
    "server_default_text": (
        _with(Column("secret", _deterministic(), server_default=text("'x'"))),
        "database",
    ),
    "server_onupdate": (
        _with(Column("secret", _randomized(), server_onupdate=text("'x'"))),
        "database",
    ),
    "sql_default": (_with(Column("secret", _randomized(), default=func.now())), "database"),
    "sql_onupdate": (_with(Column("secret", _randomized(), onupdate=func.now())), "database"),
    "sequence_default": (_with(Column("secret", _randomized(), Sequence("s"))), "database"),
    "computed": (_with(Column("secret", _randomized(), Computed("id + 1"))), "database"),
    "identity": (
        lambda: Table(
            "accounts",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("secret", KMSEncrypted(Integer), Identity()),
        ),
        "database",
    ),
    "primary_key": (
        lambda: Table("accounts", MetaData(), Column("secret", _deterministic(), primary_key=True)),
        "primary key",
    ),
    "primary_key_constraint": (
        lambda: Table(
            "accounts",
            MetaData(),
            Column("secret", _deterministic()),
            PrimaryKeyConstraint("secret"),
        ),
        "primary key",
    ),
    "foreign_key_constraint": (
        lambda: Table(
            "accounts",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("secret", _deterministic()),
            ForeignKeyConstraint(["secret"], ["owners.email"]),
        ),
        "foreign key",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED_DEFINITIONS))
def test_definitions_that_cannot_work_are_refused_when_defined(name: str) -> None:
    define, reason = REFUSED_DEFINITIONS[name]
    with pytest.raises((ConfigurationError, UnsupportedQueryError), match=reason) as info:
        define()
    assert (info.value.table, info.value.column) == ("accounts", "secret")
    assert "accounts.secret" in str(info.value)


def test_orm_primary_key_on_an_encrypted_column_is_refused() -> None:
    class Local(DeclarativeBase):
        pass

    with pytest.raises(ConfigurationError, match="primary key"):

        class Account(Local):
            __tablename__ = "accounts"
            secret: Mapped[str] = mapped_column(
                KMSEncrypted(String(100), deterministic=True), primary_key=True
            )

    Local.registry.dispose()


def test_mapper_primary_key_on_an_encrypted_column_is_refused() -> None:
    class Local(DeclarativeBase):
        pass

    accounts = Table(
        "accounts",
        Local.metadata,
        Column("id", Integer, primary_key=True),
        Column("secret", KMSEncrypted(String(100), deterministic=True)),
    )

    class Account(Local):
        __table__ = accounts
        __mapper_args__ = {"primary_key": [accounts.c.secret]}  # noqa: RUF012

    try:
        with pytest.raises(ConfigurationError, match="primary key") as info:
            configure_mappers()
        assert (info.value.table, info.value.column) == ("accounts", "secret")
    finally:
        Local.registry.dispose()


ACCEPTED_DEFINITIONS: dict[str, Callable[[], Any]] = {
    "unique_deterministic": _with(Column("secret", _deterministic(), unique=True)),
    "index_deterministic": _with(Column("secret", _deterministic(), index=True)),
    "unique_constraint_deterministic": _with(
        Column("secret", _deterministic()), UniqueConstraint("secret")
    ),
    "python_default": _with(Column("secret", _randomized(), default="none yet")),
    "python_callable_default": _with(Column("secret", _randomized(), default=lambda: "made")),
    "python_onupdate": _with(Column("secret", _randomized(), onupdate=lambda: "changed")),
}


@pytest.mark.parametrize("name", list(ACCEPTED_DEFINITIONS))
def test_definitions_that_work_are_accepted(name: str) -> None:
    ACCEPTED_DEFINITIONS[name]()


def test_create_all_checks_the_tables_again(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    table = Table(
        "accounts",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("secret", _randomized()),
    )
    table.c.secret.server_default = text("'x'")  # set after the definition was checked
    with pytest.raises(ConfigurationError, match="database") as info:
        metadata.create_all(engine)
    assert (info.value.table, info.value.column) == ("accounts", "secret")
    with engine.connect() as conn:
        assert not engine.dialect.has_table(conn, "accounts")


def test_python_defaults_are_encrypted(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    table = Table(
        "accounts",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("code", KMSEncrypted(String(20), deterministic=True), default="none"),
        Column("note", KMSEncrypted(String(20)), default=lambda: "made"),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1}])
        conn.execute(table.insert(), [{"id": 2, "note": "given"}])
    with engine.connect() as conn:
        assert conn.execute(select(table.c.code, table.c.note).order_by(table.c.id)).all() == [
            ("none", "made"),
            ("none", "given"),
        ]
        assert conn.execute(select(table.c.id).where(table.c.code == "none")).scalars().all() == [
            1,
            2,
        ]
        stored = conn.execute(text("SELECT code, note FROM accounts")).all()
    assert all(
        bytes(value)[:1] != b"n" and b"made" not in bytes(value) for row in stored for value in row
    )
