"""``python -m search`` is the ``search`` command."""

from search.cli import app

app(prog_name="search")
