"""The bench tests run in a fresh folder, like the search tests."""

from tests.search.conftest import workdir  # noqa: F401  (a fixture, used by name)
