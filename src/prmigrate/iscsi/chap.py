"""CHAP authentication for iSCSI login, sans-IO (RFC 7143 12.1.3, RFC 1994).

Only CHAP_A=5 (MD5). Response = MD5(identifier || secret || challenge).
Binary values travel as ``0x`` hex or ``0b`` base64 (RFC 7143 6.1).

Exchange, in the security stage (I = initiator, T = target)::

    I: AuthMethod=CHAP           T: AuthMethod=CHAP
    I: CHAP_A=5                  T: CHAP_A=5 CHAP_I=<id> CHAP_C=<challenge>
    I: CHAP_N=<name> CHAP_R=<response> [CHAP_I=<id2> CHAP_C=<challenge2>]
                                 T: [CHAP_N=<tname> CHAP_R=<response2>]   (mutual)

:class:`ChapAuthenticator` is the target side, :class:`ChapClient` the
initiator side. Both take the random source as a parameter so tests are
deterministic. Every failure raises ``LoginError(AUTHENTICATION_FAILURE)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum

from .login import LoginError
from .pdu import LoginStatus

CHALLENGE_LEN = 16


class ChapAlgorithm(IntEnum):
    """CHAP_A values (IANA PPP authentication algorithms)."""

    MD5 = 5


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret (``secret`` >= 12 bytes is recommended)."""

    user: str
    secret: bytes

    @staticmethod
    def make(user: str, secret: str | bytes) -> ChapCredentials:
        return ChapCredentials(user, secret.encode() if isinstance(secret, str) else secret)


def chap_md5(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes((identifier & 0xFF,)) + secret + challenge).digest()


def encode_binary(value: bytes) -> str:
    return "0x" + value.hex()


def decode_binary(text: str) -> bytes:
    """``0x``/``0X`` hex or ``0b``/``0B`` base64; ValueError otherwise."""
    prefix, body = text[:2], text[2:]
    try:
        if prefix in ("0x", "0X"):
            if len(body) % 2:
                body = "0" + body
            return bytes.fromhex(body)
        if prefix in ("0b", "0B"):
            return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"bad binary value {text[:20]!r}") from exc
    raise ValueError(f"binary value without 0x/0b prefix: {text[:20]!r}")


def _fail(message: str) -> LoginError:
    return LoginError(LoginStatus.AUTHENTICATION_FAILURE, message)


def _algorithms(text: str) -> list[str]:
    return [a.strip() for a in text.split(",")]


class ChapAuthenticator:
    """Target side: checks the initiator, and answers a mutual challenge.

    ``lookup(name)`` returns the secret for an initiator's CHAP_N (or None);
    ``mutual`` are the target's credentials for mutual CHAP (None: one-way;
    an initiator asking for mutual CHAP is then refused).
    """

    def __init__(
        self,
        lookup: Callable[[str], bytes | None] | Mapping[str, bytes],
        mutual: ChapCredentials | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._lookup = lookup.get if isinstance(lookup, Mapping) else lookup
        self.mutual = mutual
        self._random = random
        self._identifier: int | None = None
        self._challenge = b""
        self.done = False
        self.user: str | None = None  # authenticated CHAP_N

    def step(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Consume the CHAP_* keys of one request; pairs to answer with."""
        if self.done:
            raise _fail("CHAP already complete")
        if self._identifier is None:
            if "CHAP_A" not in keys:
                return []
            if str(int(ChapAlgorithm.MD5)) not in _algorithms(keys["CHAP_A"]):
                raise _fail(f"CHAP_A={keys['CHAP_A']} lacks MD5")
            self._identifier = self._random(1)[0]
            self._challenge = self._random(CHALLENGE_LEN)
            return [
                ("CHAP_A", str(int(ChapAlgorithm.MD5))),
                ("CHAP_I", str(self._identifier)),
                ("CHAP_C", encode_binary(self._challenge)),
            ]
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or resp is None:
            raise _fail("CHAP_N/CHAP_R missing")
        secret = self._lookup(name)
        try:
            got = decode_binary(resp)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if secret is None or not hmac.compare_digest(got, chap_md5(self._identifier, secret, self._challenge)):
            raise _fail(f"CHAP response of {name!r} does not match")
        self.user = name
        out: list[tuple[str, str]] = []
        if "CHAP_I" in keys or "CHAP_C" in keys:
            if self.mutual is None:
                raise _fail("mutual CHAP requested but not configured")
            try:
                ident = int(keys["CHAP_I"])
                challenge = decode_binary(keys["CHAP_C"])
            except (KeyError, ValueError) as exc:
                raise _fail(f"bad mutual challenge: {exc}") from None
            if not 0 <= ident <= 255 or not challenge:
                raise _fail("bad mutual challenge")
            if challenge == self._challenge:
                raise _fail("mutual challenge reflects ours")  # RFC 7143 12.1.3
            out = [
                ("CHAP_N", self.mutual.user),
                ("CHAP_R", encode_binary(chap_md5(ident, self.mutual.secret, challenge))),
            ]
        elif self.mutual is not None:
            raise _fail("target requires mutual CHAP")
        self.done = True
        return out


class ChapClient:
    """Initiator side. ``mutual`` set: also authenticate the target
    (``mutual.user`` is the expected target CHAP_N, ``mutual.secret`` its secret)."""

    def __init__(
        self,
        credentials: ChapCredentials,
        mutual: ChapCredentials | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.credentials = credentials
        self.mutual = mutual
        self._random = random
        self._identifier = 0
        self._challenge = b""
        self.answered = False
        self.done = False

    def start(self) -> list[tuple[str, str]]:
        return [("CHAP_A", str(int(ChapAlgorithm.MD5)))]

    def step(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Consume the target's CHAP_* keys; pairs for the next request."""
        if not self.answered:
            if keys.get("CHAP_A") != str(int(ChapAlgorithm.MD5)):
                raise _fail(f"target chose CHAP_A={keys.get('CHAP_A')}")
            try:
                ident = int(keys["CHAP_I"])
                challenge = decode_binary(keys["CHAP_C"])
            except (KeyError, ValueError) as exc:
                raise _fail(f"bad challenge: {exc}") from None
            self.answered = True
            out = [
                ("CHAP_N", self.credentials.user),
                ("CHAP_R", encode_binary(chap_md5(ident, self.credentials.secret, challenge))),
            ]
            if self.mutual is not None:
                self._identifier = self._random(1)[0]
                self._challenge = self._random(CHALLENGE_LEN)
                if self._challenge == challenge:
                    raise _fail("challenge collision")
                out += [("CHAP_I", str(self._identifier)), ("CHAP_C", encode_binary(self._challenge))]
            else:
                self.done = True
            return out
        if self.mutual is None or self.done:
            return []
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name != self.mutual.user or resp is None:
            raise _fail(f"target CHAP_N {name!r} unexpected")
        try:
            got = decode_binary(resp)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if not hmac.compare_digest(got, chap_md5(self._identifier, self.mutual.secret, self._challenge)):
            raise _fail("target CHAP response does not match")
        self.done = True
        return []
