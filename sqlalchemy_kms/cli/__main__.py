"""``python -m sqlalchemy_kms.cli``: the ``sqlalchemy-kms`` command."""

from . import main

main()
