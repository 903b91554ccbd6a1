"""Fixtures of the cli tests: the tiny models come from tests/conftest.py."""

from tests.one_thread import _one_thread  # noqa: F401  (autouse: one torch thread)
