"""``python -m prmigrate``: the same as the ``prmigrate`` command."""

from .cli import entry

entry()
