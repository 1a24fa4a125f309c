"""Log files reopened on SIGHUP (logrotate moves them away, then signals)."""

from __future__ import annotations

import logging


def reopen_log_files() -> int:
    """Close every ``logging.FileHandler`` of the root logger; each opens its
    path again at its next record. Returns how many there were."""
    n = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
            finally:
                handler.release()
            n += 1
    return n
