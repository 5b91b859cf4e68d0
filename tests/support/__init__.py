"""Helpers shared by the test suite (fixtures live in tests/conftest.py)."""

from tests.support.postgres import PgTestContext

__all__ = ["PgTestContext"]
