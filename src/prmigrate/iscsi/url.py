"""iSCSI URLs in libiscsi's form.

``iscsi://[user[%password]@]host[:port]/target-iqn/lun``

The user/password separator is ``%`` (libiscsi's choice, so that a password
may hold ``:``); no other percent-decoding is done. ``host`` may be an IPv6
literal in brackets. The port defaults to 3260, the
IANA-registered iSCSI port. The LUN is a decimal number. A URL without ``/target/lun`` is a
portal URL, usable for discovery only (``parse_portal``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 3260
SCHEME = "iscsi://"


class UrlError(ValueError):
    """The string is not an iSCSI URL of the supported form."""


@dataclass(frozen=True, slots=True)
class IscsiUrl:
    host: str
    port: int = DEFAULT_PORT
    target: str = ""
    lun: int = 0
    user: str | None = None
    password: str | None = None

    @property
    def portal(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return format_portal(self.host, self.port)

    def __str__(self) -> str:
        cred = ""
        if self.user is not None:
            cred = self.user
            if self.password is not None:
                cred += "%" + self.password
            cred += "@"
        tail = f"/{self.target}/{self.lun}" if self.target else ""
        return f"{SCHEME}{cred}{self.portal}{tail}"


def format_portal(host: str, port: int = DEFAULT_PORT) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_portal(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``host[:port]`` / ``[v6]:port``; a trailing ``,tpgt`` (as in a
    SendTargets TargetAddress) is ignored."""
    text = text.strip()
    if "," in text:
        text = text.split(",", 1)[0]
    if not text:
        raise UrlError("empty portal")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UrlError(f"unterminated IPv6 literal in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not host:
            raise UrlError("empty IPv6 literal")
        if rest == "":
            return host, default_port
        if not rest.startswith(":"):
            raise UrlError(f"junk after IPv6 literal in {text!r}")
        return host, _port(rest[1:])
    if text.count(":") > 1:  # bare IPv6 address, no port
        return text, default_port
    host, sep, port = text.partition(":")
    if not host:
        raise UrlError(f"empty host in {text!r}")
    return host, _port(port) if sep else default_port


def _port(text: str) -> int:
    if not text.isdigit():
        raise UrlError(f"bad port {text!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise UrlError(f"port {port} out of range")
    return port


def parse_url(text: str, *, require_lun: bool = True) -> IscsiUrl:
    """Parse an ``iscsi://`` URL. With ``require_lun=False`` a portal-only
    URL (``iscsi://host[:port][/]``) is accepted, target ``""``."""
    if not text.lower().startswith(SCHEME):
        raise UrlError(f"not an iscsi:// URL: {text!r}")
    rest = text[len(SCHEME) :]
    if "?" in rest:  # libiscsi allows ?key=value arguments; none are supported yet
        raise UrlError("URL arguments (?...) are not supported")
    user = password = None
    slash = rest.find("/")
    authority = rest if slash < 0 else rest[:slash]
    path = "" if slash < 0 else rest[slash + 1 :]
    if "@" in authority:
        cred, authority = authority.rsplit("@", 1)
        user, sep, pw = cred.partition("%")
        if not user:
            raise UrlError("empty user name before '@'")
        password = pw if sep else None
    host, port = parse_portal(authority)
    if not path.strip("/"):
        if require_lun:
            raise UrlError(f"URL has no /target/lun: {text!r}")
        return IscsiUrl(host, port, "", 0, user, password)
    target, sep, lun = path.rpartition("/")
    if not sep or not target:
        raise UrlError(f"URL needs /target-iqn/lun: {text!r}")
    if "/" in target:
        raise UrlError(f"target name may not contain '/': {target!r}")
    if not lun.isdigit():
        raise UrlError(f"bad LUN {lun!r}")
    lun_n = int(lun)
    if lun_n > 0x3FFF:  # flat/peripheral addressing covers 0..16383
        raise UrlError(f"LUN {lun_n} out of range")
    return IscsiUrl(host, port, target, lun_n, user, password)
