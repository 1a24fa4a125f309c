"""The demo's report as text: a pure function of the result dict
(``scenario.run_demo``), so ``--json`` and the text say the same thing."""

from __future__ import annotations

from typing import Any


def type_name(t: str | None) -> str:
    """The one printed form of a reservation type (scsi/vocabulary.py); the
    result dict carries it already (a saved older report, the enum name)."""
    from ..scsi.vocabulary import PrTypeError, words

    if t is None:
        return "-"
    try:
        return words(t)
    except PrTypeError:
        return t


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _holder(snap: dict[str, Any] | None) -> str:
    if not snap:
        return "?"
    h = snap.get("holder")
    if h is None:
        return "no reservation"
    who = f"{h['host']} " if h.get("host") else ""
    return f"{who}{h['port']}  key {h['key']}  {type_name(h['type'])}"


def _takeover(t: dict[str, Any]) -> str:
    """The destination's own PR takeover (its PREEMPT) and the source's view
    of the same phase (state sent -> destination done)."""
    peer = t.get("peer_takeover_us")
    if not peer and not t.get("round_trips_in_pause"):
        return f"no PR takeover (state transfer {_ms(t.get('takeover_s'))})"
    peer_s = None if peer is None else peer / 1e6
    return (f"PR takeover {_ms(peer_s)} at the destination "
            f"({_ms(t.get('takeover_s'))} seen from the source)")


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per move: what the table at the end of the report shows."""
    rows = []
    for run in report.get("runs", []):
        for m in run.get("moves", []):
            t = (m.get("migration") or {}).get("timings") or {}
            h = (m.get("after") or {}).get("holder")
            p = m.get("source_probe") or {}
            held = any(r["port"] == p.get("nexus")
                       for r in (m.get("before") or {}).get("registrations", []))
            rows.append({
                "run": run["name"],
                "move": f"{m['from']} -> {m['to']}",
                "holder_after": f"{h['host'] or '?'} key {h['key']}" if h else "none",
                "pause_ms": None if t.get("pause_s") is None else round(t["pause_s"] * 1000, 2),
                "takeover_ms": None if not t.get("peer_takeover_us") else t["peer_takeover_us"] / 1000,
                "round_trips": t.get("round_trips_in_pause"),
                "source_fenced": p.get("fenced"),
                "source_registered_before": held,
                "guest_acked_after": ((m.get("guest") or {}).get("writes") or {}).get("acknowledged"),
                "guest_conflicts_after": ((m.get("guest") or {}).get("writes") or {}).get("conflicts"),
            })
    return rows


def render_summary(report: dict[str, Any]) -> list[str]:
    rows = summary_rows(report)
    if not rows:
        return []
    head = ("run", "move", "holder after", "pause", "PR takeover", "RTs", "source fenced",
            "guest after: ok/conflict")
    cells = [head]
    for r in rows:
        cells.append((
            r["run"], r["move"], r["holder_after"],
            "-" if r["pause_ms"] is None else f"{r['pause_ms']:.1f} ms",
            "-" if r["takeover_ms"] is None else f"{r['takeover_ms']:.1f} ms",
            str(r["round_trips"]),
            "-" if r["source_fenced"] is None else
            ("yes" if r["source_fenced"] else "no")
            + ("" if r["source_registered_before"] else " (never held)"),
            "-" if r["guest_acked_after"] is None
            else f"{r['guest_acked_after']}/{r['guest_conflicts_after']}",
        ))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]


def _registrations(snap: dict[str, Any] | None) -> list[str]:
    if not snap:
        return []
    out = []
    for r in snap.get("registrations", []):
        mark = " (holder)" if r.get("holder") else ""
        who = f"{r['host']}: " if r.get("host") else ""
        out.append(f"{who}{r['port']} key {r['key']}{mark}")
    return out


def _writes(w: dict[str, int]) -> str:
    return (f"issued {w['issued']}, acknowledged {w['acknowledged']}, verified {w['verified']}, "
            f"lost {w['lost']}, conflicts {w['conflicts']}, errors {w['errors']}")


def _check_line(c: dict[str, Any]) -> str:
    if c["ok"]:
        mark = "expected" if c.get("expected_consequence") else "ok"
    else:
        mark = "FAILED"
    detail = f" ({c['detail']})" if c.get("detail") else ""
    return f"  [{mark:>8}] {c['name']}{detail}"


def render_run(run: dict[str, Any]) -> list[str]:
    lines = [f"=== {run['name']}: machine {run.get('machine')}, device {run.get('device')}"
             f" (migrate-pr {'on' if run.get('migrate_pr') else 'off'}) ==="]
    if "guest_url" in run:
        g = run.get("guest", {})
        lines.append(f"guest {g.get('initiator', '?')},i,{g.get('isid', '?')} -> {run['guest_url']}")
        lines.append(f"reservation: key {run['key']}, type {type_name(run['reservation_type'])}; "
                     f"backend nexus ISID {run.get('backend_isid', '?')}")
    if "initial" in run:
        lines.append(f"holder at start:   {_holder(run['initial'])}")
    for m in run.get("moves", []):
        t = (m.get("migration") or {}).get("timings") or {}
        lines.append("")
        lines.append(f"move {m['n']}: {m['from']} -> {m['to']}  "
                     f"({(m.get('migration') or {}).get('status')}, {m.get('wall_s', 0) * 1000:.0f} ms wall)")
        lines.append(f"  holder before:   {_holder(m.get('before'))}")
        lines.append(f"  holder after:    {_holder(m.get('after'))}")
        regs = _registrations(m.get("after"))
        lines.append(f"  registrations:   {'; '.join(regs) if regs else 'none'}")
        lines.append(f"  timings:         total {_ms(t.get('total_s'))}, guest pause {_ms(t.get('pause_s'))}, "
                     f"{_takeover(t)}, "
                     f"backend PR round trips in the pause: {t.get('round_trips_in_pause', '-')}"
                     + (" (QEMU 11: REGISTER + PREEMPT = 2)" if t.get("round_trips_in_pause") else ""))
        g = m.get("guest") or {}
        if g:
            lines.append(f"  guest:           longest stall during the move {_ms(g.get('longest_stall_s'))}; "
                         f"now connected to {g.get('connected_to')} "
                         f"(logout requests so far {g.get('logout_requests')}, re-logins {g.get('reconnects')})")
            evs = g.get("events") or []
            if evs:
                t0 = evs[0]["t"]
                lines.append("  guest timeline:")
                for e in evs[:8]:
                    lines.append(f"    +{(e['t'] - t0) * 1000:6.1f} ms  {e['what']}")
            lines.append(f"  during the move: {_writes(g['during_move'])}")
            lines.append(f"  on {m['to']}:{' ' * max(1, 13 - len(m['to']))}{_writes(g['writes'])}")
        p = m.get("source_probe")
        if p:
            verdict = "FENCED" if p["fenced"] else "NOT fenced"
            if not p["fenced"] and run.get("migrate_pr") is False:
                verdict += f" (expected with migrate-pr off: {m['from']} still holds the reservation)"
            ua = f" (after unit attention: {', '.join(p['unit_attentions'])})" if p["unit_attentions"] else ""
            lines.append(f"  {m['from']} probe:     WRITE from {p['nexus']} -> {p['status']}{ua}: {verdict}")
    g = run.get("guest")
    if g:
        lines.append("")
        lines.append(f"guest total:       {_writes(g['writes'])}")
        if g.get("lost_writes"):
            for lw in g["lost_writes"]:
                lines.append(f"  LOST seq {lw['seq']} LBA {lw['lba']}: {lw['why']}")
        lines.append(f"guest session:     {g['logout_requests']} logout request(s), {g['reconnects']} re-login(s), "
                     f"unit attentions: {', '.join(g['unit_attentions']) or 'none'}")
    if "sweep" in run:
        lines.append(f"final read-back:   {run['sweep']['blocks_checked']} blocks checked")
    if "final" in run:
        lines.append(f"holder at end:     {_holder(run['final'])}")
    if "cleanup" in run:
        lines.append(f"guest cleanup:     {run['cleanup']}")
    if run.get("error"):
        lines.append(f"ERROR: {run['error']}")
        for name, tail in (run.get("logs") or {}).items():
            lines.append(f"--- {name} log (tail) ---")
            lines.extend(tail.splitlines())
    lines.append("")
    lines.append("checks:")
    lines.extend(_check_line(c) for c in run.get("checks", []))
    return lines


def render(report: dict[str, Any]) -> str:
    lines = ["prmigrate demo: a guest keeps its SCSI persistent reservation across live migration",
             ""]
    t = report.get("target")
    if t:
        lines.append(f"shared target {t['iqn']} on {t['portal']} ({t['luns']} LUNs); "
                     f"hosts: hosta 127.0.0.2, hostb 127.0.0.3; observer nexus reads READ FULL STATUS")
        lines.append("")
    for run in report.get("runs", []):
        lines.extend(render_run(run))
        lines.append("")
    if report.get("error"):
        lines.append(f"ERROR: {report['error']}")
    table = render_summary(report)
    if table:
        lines.append("summary (holder from READ FULL STATUS; RTs = backend PR round trips in the pause):")
        lines.extend("  " + row for row in table)
        lines.append("")
    off = next((r for r in report.get("runs", []) if r.get("name") == "migrate-pr=off"), None)
    if off is not None and off.get("ok"):
        lines.append("migrate-pr=off: the reservation stayed on hosta's nexus and the guest's writes "
                     "through hostb were refused with RESERVATION CONFLICT -- the documented consequence, "
                     "not a failure.")
    left = report.get("left_running") or []
    procs = report.get("processes", [])
    exits = ", ".join(f"{p['name']} {p['exit']}" for p in procs)
    lines.append(f"processes: {len(procs)} started (exit status: {exits}); "
                 f"left running: {'none' if not left else ', '.join(left)}")
    if not report.get("workdir_removed"):
        lines.append(f"work directory kept: {report.get('workdir')}")
    lines.append(f"result: {'OK' if report.get('ok') else 'FAILED'} in {report.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)
