"""Docstring examples of the public API must run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import recps.embedding

MODULES = ["recps.embedding"] + [
    f"recps.embedding.{m.name}" for m in pkgutil.iter_modules(recps.embedding.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
