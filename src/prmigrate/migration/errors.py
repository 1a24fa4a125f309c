"""One exception family for the migration package, each carrying its wire meaning.

``MigrationError.reason`` is the ``AbortReason`` the peer is told in an ABORT
message; the shell turns any of these into that message in exactly one place.
"""

from __future__ import annotations

from enum import IntEnum


class AbortReason(IntEnum):
    """Why a migration stopped; the code carried by ABORT and ROLLBACK."""

    UNSPECIFIED = 0
    CANCELLED = 1  # the operator (or the source's orchestrator) gave up
    TIMEOUT = 2
    CONNECTION_LOST = 3
    AUTHENTICATION = 4  # the peer does not know the cluster secret
    BAD_FRAME = 5  # channel framing, integrity or replay failure
    BAD_STREAM = 6  # the device state stream could not be decoded
    PROTOCOL = 7  # a message that is not legal in the receiver's state
    DEVICE = 8  # the destination could not create / load the device
    PR_SETUP = 9  # registering the guests' keys on the destination failed
    PR_TAKEOVER = 10  # the PREEMPT (or a fixup) inside the pause failed
    PR_RELEASE = 11  # the source could not drop its own registrations
    GUEST = 12  # the source could not hold / drain the guest


class MigrationError(Exception):
    """Base of every error the migration core raises."""

    reason: AbortReason = AbortReason.UNSPECIFIED


# -- the state stream (stream.py)
class StreamError(MigrationError):
    reason = AbortReason.BAD_STREAM


class StreamTruncated(StreamError):
    """The buffer ends inside a header, a section or before the end marker."""


class StreamTrailingData(StreamError):
    """Bytes follow the end marker."""


class BadMagic(StreamError):
    """Not a prmigrate device state stream."""


class UnsupportedVersion(StreamError):
    """The stream format or a section version is newer (or older) than we read."""


class UnknownSection(StreamError):
    """A section name this reader does not know: refuse, never skip."""


class SectionError(StreamError):
    """A known section whose fields are missing, mistyped, out of range,
    duplicated or out of order."""


# -- the authenticated channel (channel.py)
class ChannelError(MigrationError):
    reason = AbortReason.BAD_FRAME


class AuthenticationFailed(ChannelError):
    """The peer's proof does not verify: it does not hold the cluster secret."""

    reason = AbortReason.AUTHENTICATION


class FrameError(ChannelError):
    """Malformed frame: bad length, unknown type, type not legal now."""


class IntegrityError(FrameError):
    """A frame's MAC does not verify (tampered, or keyed for another session)."""


class ReplayError(FrameError):
    """A frame's sequence number is not the next one expected."""


class ChannelClosed(ChannelError):
    """The channel failed or was closed; nothing more flows on it."""


# -- machines and plans
class EventNotAllowed(MigrationError):
    """An event that the state table does not allow in the current state."""

    reason = AbortReason.PROTOCOL


class PlanError(MigrationError):
    """The PR state cannot be turned into a takeover plan (inconsistent)."""

    reason = AbortReason.PR_TAKEOVER
