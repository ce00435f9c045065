#!/usr/bin/env python3
"""Turns bench/run.sh's results.jsonl into the Markdown table: medians over runs, ratios to
changecast from the same run set."""
import json, statistics, sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(list)
for r in rows:
    by[(r["workload"], r["server"])].append(r)

def med(rs, f):
    vals = [f(r) for r in rs if not r.get("failed")]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fmt(v, nd=1):
    if v is None: return "—"
    if isinstance(v, float) and abs(v) >= 1000: return f"{v:,.0f}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)

def ratio(v, base, higher_better=True):
    if v is None or not base: return ""
    return f" ({v / base:.2f}×)"

servers = []
for r in rows:
    if r["server"] not in servers: servers.append(r["server"])
out = []
for wl, title in [("a", "(a) per-user events: each change to one user, 1–3 connections per user"),
                  ("b", "(b) account-wide events: each change to every user of a business"),
                  ("bmax", "(b) account-wide events at 1M deliveries/s offered: capacity")]:
    present = [s for s in servers if (wl, s) in by]
    if not present: continue
    ex = by[(wl, present[0])][0]
    out.append(f"\n### {title}\n")
    out.append(f"{ex.get('requested')} connections, {ex.get('keys')} streams, writer {ex.get('writer', {}).get('rows_per_s', 0):.0f} orders/s; "
               f"medians of {len(by[(wl, present[0])])} runs; ratio to changecast in parentheses.\n")
    out.append("| server | runs | connections | delivered events/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | errors | server CPU s | deliveries per server CPU s | server RSS max MiB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {k: med(by.get((wl, "changecast"), []), f) for k, f in
            [("eps", lambda r: r.get("events_per_s")), ("p99", lambda r: r.get("p99_ms"))]}
    for s in present:
        rs = by[(wl, s)]
        ok = [r for r in rs if not r.get("failed")]
        eps = med(rs, lambda r: r.get("events_per_s"))
        p99 = med(rs, lambda r: r.get("p99_ms"))
        out.append(f"| {s} | {len(ok)}/{len(rs)} | {fmt(med(rs, lambda r: r.get('connections')), 0)} | {fmt(eps, 0)}{ratio(eps, base['eps'])} | "
                   f"{fmt(med(rs, lambda r: r.get('p50_ms')), 2)} | {fmt(p99, 2)}{ratio(p99, base['p99'])} | {fmt(med(rs, lambda r: r.get('p999_ms')), 2)} | "
                   f"{fmt(med(rs, lambda r: r.get('max_ms')), 1)} | {fmt(med(rs, lambda r: r.get('lost')), 0)} | {fmt(med(rs, lambda r: r.get('errors')), 0)} | "
                   f"{fmt(med(rs, lambda r: r.get('server_cpu_s')), 2)} | {fmt(med(rs, lambda r: r['received'] / r['server_cpu_s'] if r.get('server_cpu_s') else None), 0)} | {fmt(med(rs, lambda r: r.get('rss_max_kb', 0) / 1024), 1)} |")

present = [s for s in servers if ("e", s) in by]
if present:
    ex = by[("e", present[0])][0]
    out.append("\n### (e) 1% of clients stop reading: the others' latency and the server's memory\n")
    out.append(f"{ex.get('requested')} connections, account-wide, writer {ex.get('writer', {}).get('rows_per_s', 0):.0f} orders/s, "
               f"the same run without (e0) and with {ex.get('stalled')} connections that never read after `ready` (e); medians; "
               "latency and losses are the reading connections'.\n")
    out.append("| server | runs | p99 ms without | p99 ms with | p99.9 ms with | lost | errors | stalled cut off by the server | RSS max MiB without | RSS max MiB with | RSS end MiB with |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in present:
        rs, r0 = by[("e", s)], by.get(("e0", s), [])
        cut = lambda r: sum(v for k, v in r.get("stalled_close_codes", {}).items() if k != "none")
        out.append(f"| {s} | {len([r for r in rs if not r.get('failed')])}/{len(rs)} | {fmt(med(r0, lambda r: r.get('p99_ms')), 2)} | "
                   f"{fmt(med(rs, lambda r: r.get('p99_ms')), 2)} | {fmt(med(rs, lambda r: r.get('p999_ms')), 2)} | "
                   f"{fmt(med(rs, lambda r: r.get('lost')), 0)} | {fmt(med(rs, lambda r: r.get('errors')), 0)} | "
                   f"{fmt(med(rs, cut), 0)} of {fmt(med(rs, lambda r: r.get('stalled')), 0)} (codes: {rs[-1].get('stalled_close_codes', {})}) | "
                   f"{fmt(med(r0, lambda r: r.get('rss_max_kb', 0) / 1024), 1)} | {fmt(med(rs, lambda r: r.get('rss_max_kb', 0) / 1024), 1)} | "
                   f"{fmt(med(rs, lambda r: r.get('rss_end_kb', 0) / 1024), 1)} |")

present = [s for s in servers if ("c", s) in by]
if present:
    out.append("\n### (c) idle authenticated connections: resident memory per connection\n")
    out.append("| server | runs | connections held | RSS before MiB | RSS held MiB | KiB per connection |")
    out.append("|---|---|---|---|---|---|")
    per = lambda r: (r["rss_max_kb"] - r["rss0_kb"]) / max(r["connections"], 1)
    base = med(by.get(("c", "changecast"), []), per)
    for s in present:
        rs = by[("c", s)]
        v = med(rs, per)
        out.append(f"| {s} | {len([r for r in rs if not r.get('failed')])}/{len(rs)} | {fmt(med(rs, lambda r: r['connections']), 0)} | "
                   f"{fmt(med(rs, lambda r: r['rss0_kb'] / 1024), 1)} | {fmt(med(rs, lambda r: r['rss_max_kb'] / 1024), 1)} | {fmt(v, 2)}{ratio(v, base)} |")

ramp = sorted({(int(w[1:]), w) for (w, s) in by if w.startswith("d")})
if ramp:
    out.append("\n### (d) connection ramp (changecast, idle, 4 source addresses)\n")
    out.append("| requested | runs | held (median) | held (min) | connect s | errors | RSS MiB | KiB per connection |")
    out.append("|---|---|---|---|---|---|---|---|")
    for n, w in ramp:
        rs = by[(w, "changecast")]
        ok = [r for r in rs if not r.get("failed")]
        out.append(f"| {n} | {len(ok)}/{len(rs)} | {fmt(med(rs, lambda r: r['connections']), 0)} | {min((r['connections'] for r in ok), default='—')} | "
                   f"{fmt(med(rs, lambda r: r.get('connect_seconds')), 1)} | {fmt(med(rs, lambda r: r.get('connect_errors', 0) + r.get('handshake_errors', 0)), 0)} | "
                   f"{fmt(med(rs, lambda r: r['rss_max_kb'] / 1024), 1)} | {fmt(med(rs, lambda r: (r['rss_max_kb'] - r['rss0_kb']) / max(r['connections'], 1)), 2)} |")
print("\n".join(out))
