"""The public surface: what ``sqlalchemy_kms`` exports is what ``__all__`` says."""

from __future__ import annotations

import types

import sqlalchemy_kms


def test_all_lists_exactly_the_exported_names() -> None:
    exported = {
        name
        for name, value in vars(sqlalchemy_kms).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(sqlalchemy_kms.__all__) - {"__version__", "errors"}
    assert isinstance(sqlalchemy_kms.errors, types.ModuleType)
