"""sqlalchemy-kms: transparent column encryption for SQLAlchemy with KMS-wrapped data keys.

Envelope encryption for SQLAlchemy columns: a master key stays in the KMS,
each table gets a data key wrapped by it and stored in a key table of the
application's database, and values are encrypted with AES-256-GCM (or
AES-SIV for deterministic columns) under that data key::

    >>> from sqlalchemy import Integer, String, create_engine, select
    >>> from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
    >>> from sqlalchemy_kms import KMSEncrypted, KeyVault, LocalKms
    >>> class Base(DeclarativeBase):
    ...     pass
    >>> class Patient(Base):
    ...     __tablename__ = "patients_doc"
    ...     id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ...     name: Mapped[str] = mapped_column(KMSEncrypted(String(200)))
    >>> engine = create_engine("sqlite://")
    >>> vault = KeyVault(engine, LocalKms(bytes(32)))   # AwsKms("alias/...") in production
    >>> vault.create_table()
    >>> Base.metadata.create_all(engine)
    >>> with Session(engine) as session:
    ...     session.add(Patient(name="Kim Minji"))
    ...     session.commit()
    ...     session.scalars(select(Patient.name)).one()
    'Kim Minji'
"""

from . import errors
from .errors import SQLAlchemyKMSError
from .providers import AwsKms, KeyProvider, LocalKms, MultiKms
from .types import KMSEncrypted
from .vault import KeyVault

__version__ = "0.1.0"

__all__ = [
    "AwsKms",
    "KMSEncrypted",
    "KeyProvider",
    "KeyVault",
    "LocalKms",
    "MultiKms",
    "SQLAlchemyKMSError",
    "__version__",
    "errors",
]
