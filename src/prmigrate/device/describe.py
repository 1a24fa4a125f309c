"""The ``query-devices`` entry of a device: what it fronts, its nexuses,
the PR state it tracks and how that state was last verified. Pure: the
wall clock is ``now``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..scsi.vocabulary import format_key, words
from .verify import KEYS_METHOD, KEYS_METHOD_LIMITS


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_device(dev: Any, now: float) -> dict[str, object]:
    """``dev``: a ``DeviceCore``; ``connected(backend)``: whether its
    backend session is logged in (the shell's knowledge)."""
    st = dev.snooper.state
    cfg = dev.config
    nexuses = {}
    for key, b in sorted(dev.backends().items()):
        nexuses[key] = {
            "initiator": b.port.initiator,
            "isid": f"0x{b.port.isid:012x}",
            "transport_id": str(b.port),
            "connected": dev.connected(b),
            "session": dev.link_state(b),
            "frontends": sorted(n.initiator_port for n in b.frontends),
        }
        link = nexuses[key]["session"]
        if isinstance(link, dict) and link.get("paths"):  # one nexus per path: URL, nexus, state, registered
            nexuses[key]["paths"] = link["paths"]
    last = dev.last_verified
    return {
        "name": dev.name,
        "properties": {
            "backend": cfg.backend_url,
            "backends": list(cfg.backend_urls),  # one per path (multipath: paths.py)
            "backend-target": cfg.target_iqn,
            "target": cfg.target_iqn,  # the old name of backend-target
            "lun": cfg.lun,
            "machine": cfg.machine,
            "migrate-pr": None if cfg.migrate_pr is None else ("on" if cfg.migrate_pr else "off"),
            "guests": None if cfg.guests is None else sorted(cfg.guests),
            "identity": str(cfg.identity),
        },
        "machine": cfg.machine,
        "migrate-pr": dev.migrate_pr,
        "held": dev.held,
        "backend-nexus": nexuses,
        "monitor-session": dev.monitor_link_state(),
        # REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS of the backend (None:
        # not implemented there); target-reset: what the frontend takes
        "backend-tmfs": None if dev.backend_tmfs is None else list(dev.backend_tmfs.names()),
        "target-reset": dev.target_reset_supported,
        "pr-state": {
            "method": dev.verify_method,
            "method-cannot-tell": list(KEYS_METHOD_LIMITS) if dev.verify_method == KEYS_METHOD else [],
            "open-questions": list(dev.verify_unknown),
            "last-verified": None if last is None else _utc(last),
            "last-verified-age-s": None if last is None else round(now - last, 3),
            "last-verify-error": dev.last_verify_error,
            "guests": {
                g: {
                    "key": format_key(s.key),
                    "backend-nexus": str(dev.port_of(g)),
                    "aptpl": s.aptpl,
                    "holder": s.holder,
                    "type": words(s.rtype) if s.holder else None,
                    "scope": s.scope,
                    "verified": g not in st.unverified,
                }
                for g, s in sorted(st.guests.items())
            },
            "generation": st.generation,
            "unverified": sorted(st.unverified),
        },
        "identity": None
        if dev.identity is None
        else {
            "vendor": dev.identity.vendor,
            "product": dev.identity.product,
            "serial": dev.identity.serial,
            "naa": dev.identity.naa_id,
            "blocks": dev.identity.capacity_blocks,
            "block_size": dev.identity.block_size,
        },
    }


__all__ = ["describe_device"]
