"""A LoggerAdapter that prefixes every line with a name, safely.

Names come from peers (an initiator name, a target name) and may hold any
character a name allows, ``%`` included. Put into the format string, such a
name makes ``msg % args`` fail ("Logging error", the line lost) or print
garbage; here the name is always an argument: ``"[%s] " + msg`` with the
name first, or ``"[%s] %s"`` with the message as the second argument when
the call has no arguments (its ``%`` then stays literal, as logging does).
"""

from __future__ import annotations

import logging
from typing import Any


class PrefixLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``extra[key]`` in brackets before every message."""

    key = "session"

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        name = self.extra[self.key]  # type: ignore[index]
        kwargs.setdefault("stacklevel", 1)
        if args:
            self.logger.log(level, "[%s] " + str(msg), name, *args, **kwargs)
        else:
            self.logger.log(level, "[%s] %s", name, msg, **kwargs)
