"""The key lifecycle, one job per module: rewrite rows, report, retire and destroy,
rewrap, back up and restore, verify.

Each job takes the key table (:class:`~sqlalchemy_kms._keytable.KeyTable`) and
the connections it runs on, never a vault's internals;
:class:`~sqlalchemy_kms.KeyVault` composes them into its methods
(``vault.reencrypt(...)``, ``vault.status(...)``, ``vault.verify(...)``, ...),
which is how applications, the command line and Alembic reach them.

* :mod:`.rewrite`: the keyset walk and compare-and-set updates of online jobs;
* :mod:`.columns`: re-encrypt, encrypt a column in place, decrypt it back;
* :mod:`.ddl`: the column DDL around in-place encryption;
* :mod:`.status`: keys per table and rows per key version;
* :mod:`.retire`: retire and destroy, with their guards;
* :mod:`.rewrap`: every key wrapped under another master key;
* :mod:`.backup`: export and import of the key table;
* :mod:`.verify`: decrypt every stored value and report what fails.
"""

from .ddl import binary_to_plaintext_ddl, plaintext_to_binary_ddl
from .rewrite import Progress
from .status import ColumnStatus, KeyStatus, TableStatus

__all__ = [
    "ColumnStatus",
    "KeyStatus",
    "Progress",
    "TableStatus",
    "binary_to_plaintext_ddl",
    "plaintext_to_binary_ddl",
]
