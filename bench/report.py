#!/usr/bin/env python3
"""Turns bench/run.sh's results.jsonl into the Markdown table: medians over runs, ratios to
changecast from the same run set. With --cluster: only the bcluster table (changecast
against changecast-cluster: the latency the NATS hop adds, CPU per delivery per node). With
--cap: only the capacity search's table. With --cap-verdict: reads one cap result line on
stdin and prints why that step failed (nothing if it passed): run.sh's stop rule."""
import json, statistics, sys
from collections import defaultdict

def cap_verdict(r):
    """Why a capacity step failed, or "" if it passed. A step passes when every connection was
    held, nothing was lost, there was no error, p99 stayed at or under the limit, and the
    writer offered the rate (within 5%: otherwise the writer, not the server, is the limit)."""
    if r.get("failed"): return "run failed"
    if r.get("connections") != r.get("requested"): return f"{r.get('connections')} of {r.get('requested')} connections"
    rate, wrote = r.get("rate") or r.get("cap_rate") or 0, r.get("writer", {}).get("rows_per_s", 0)
    if wrote < 0.95 * rate: return f"writer ceiling: {wrote:,.0f} of {rate:,.0f} orders/s"
    if r.get("lost"): return f"lost {r['lost']:,}"
    if r.get("errors"): return f"{r['errors']:,} errors"
    limit = r.get("cap_p99_ms", 100)
    if r.get("p99_ms", 0) > limit: return f"p99 {r['p99_ms']:,.0f} ms > {limit:g}"
    return ""

if "--cap-verdict" in sys.argv[1:]:
    print(cap_verdict(json.loads(sys.stdin.read().strip().splitlines()[-1])))
    sys.exit(0)

cluster_only = "--cluster" in sys.argv[1:]
cap_only = "--cap" in sys.argv[1:]
rows = [json.loads(l) for l in open([a for a in sys.argv[1:] if not a.startswith("--")][0]) if l.strip()]
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

def cluster_tables():
    """(bcluster): latency of both and the difference of the medians; CPU and memory per node."""
    single, clu = by.get(("bcluster", "changecast"), []), by.get(("bcluster", "changecast-cluster"), [])
    if not single and not clu: return
    ex = (single or clu)[0]
    out.append("\n### (bcluster) account-wide events through a cluster: one router and two gateways on NATS JetStream, against one process\n")
    out.append(f"{ex.get('requested')} connections, {ex.get('keys')} streams, writer {ex.get('writer', {}).get('rows_per_s', 0):.0f} orders/s "
               f"(as (b)); the cluster's connections go to the gateways n2 and n3, half of each business on each; "
               f"medians of {max(len(single), len(clu))} runs.\n")
    out.append("| server | runs | connections | delivered events/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | errors | router stayed n1 |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = ["p50_ms", "p99_ms", "p999_ms", "max_ms"]
    meds = {}
    for s, rs in [("changecast", single), ("changecast-cluster", clu)]:
        if not rs: continue
        ok = [r for r in rs if not r.get("failed")]
        meds[s] = {k: med(rs, lambda r, k=k: r.get(k)) for k in keys}
        stayed = "—" if s == "changecast" else f"{sum(1 for r in ok if r.get('router_stayed'))}/{len(ok)}"
        out.append(f"| {s} | {len(ok)}/{len(rs)} | {fmt(med(rs, lambda r: r.get('connections')), 0)} | {fmt(med(rs, lambda r: r.get('events_per_s')), 0)} | "
                   + " | ".join(fmt(meds[s][k], 2) for k in keys)
                   + f" | {fmt(med(rs, lambda r: r.get('lost')), 0)} (max {max((r.get('lost', 0) for r in ok), default='—')}) | "
                   f"{fmt(med(rs, lambda r: r.get('errors')), 0)} | {stayed} |")
    if len(meds) == 2:
        d = {k: meds["changecast-cluster"][k] - meds["changecast"][k]
             for k in keys if meds["changecast-cluster"][k] is not None and meds["changecast"][k] is not None}
        target = {"p50_ms": 2.0, "p99_ms": 10.0}
        cell = lambda k: "—" if k not in d else f"{d[k]:+.2f}" + (f" ({'meets' if d[k] <= target[k] else 'misses'} ≤ {target[k]:g})" if k in target else "")
        out.append(f"| added by the NATS hop (difference of the medians) | | | | " + " | ".join(cell(k) for k in keys) + " | | | |")
    out.append("\nCPU and memory per node. CPU s: over the load generator's whole run (2,000 handshakes, "
               f"{ex.get('writer', {}).get('seconds', 0):.0f} s of writing, the drain); the other CPU columns: from the moment every "
               "connection is ready to the end (the writes and the drain alone): its share of one core, µs per routed event "
               "(order written), per delivery of the whole run (events received by all clients) and per delivery to the node's "
               "own connections. Medians.\n")
    out.append("| server | node | CPU s | CPU s while writing | % of a core while writing | µs per routed event | µs per delivery (all) | its connections | its deliveries | µs per own delivery | RSS before MiB | RSS max MiB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, rs in [("changecast", single), ("changecast-cluster", clu)]:
        ok = [r for r in rs if not r.get("failed") and r.get("nodes")]
        if not ok: continue
        names = list(ok[0]["nodes"])
        def own(r, n):
            # A gateway's own connections and deliveries: its URL's share (per_url).
            urls = r.get("per_url", [])
            if s == "changecast": return (r["connections"], r["received"])
            gw = [n2 for n2 in names if n2.endswith("-gateway")]
            if n in gw and len(urls) == len(gw):
                u = urls[gw.index(n)]; return (u["connections"], u["received"])
            return (0, 0)
        def node_sum(r, n, k):
            vs = [v.get(k) for m, v in r["nodes"].items() if n in ("total", m)]
            return None if None in vs else sum(vs)
        for n in names + (["total"] if len(names) > 1 else []):
            cpu = lambda r, n=n: node_sum(r, n, "cpu_s")
            wcpu = lambda r, n=n: node_sum(r, n, "write_cpu_s")
            per = lambda r, x, n=n: wcpu(r) * 1e6 / x if x and wcpu(r) is not None else None
            rows_ = lambda r: r.get("writer", {}).get("rows")
            owned = (lambda r: (r["connections"], r["received"])) if n == "total" else (lambda r, n=n: own(r, n))
            rss = (lambda r, k: r[k] / 1024) if n == "total" else (lambda r, k, n=n: r["nodes"][n][k] / 1024)
            out.append(f"| {s} | {n} | {fmt(med(ok, cpu), 2)} | {fmt(med(ok, wcpu), 2)} | "
                       f"{fmt(med(ok, lambda r: 100 * wcpu(r) / r['write_s'] if r.get('write_s') and wcpu(r) is not None else None), 0)} | "
                       f"{fmt(med(ok, lambda r: per(r, rows_(r))), 0)} | {fmt(med(ok, lambda r: per(r, r.get('received'))), 2)} | "
                       f"{fmt(med(ok, lambda r: owned(r)[0]), 0)} | {fmt(med(ok, lambda r: owned(r)[1]), 0)} | {fmt(med(ok, lambda r: per(r, owned(r)[1])), 2)} | "
                       f"{fmt(med(ok, lambda r: rss(r, 'rss0_kb')), 1)} | {fmt(med(ok, lambda r: rss(r, 'rss_max_kb')), 1)} |")

def cap_table():
    """(cap): per server, each run's search (steps upwards until one fails), the median
    sustainable rate over the runs, and the details of the run with that median."""
    present = [s for s in servers if ("cap", s) in by]
    if not present: return
    ex = next(r for s in present for r in by[("cap", s)] if not r.get("failed")) if any(
        not r.get("failed") for s in present for r in by[("cap", s)]) else {}
    out.append("\n### (cap) capacity: the highest account-wide delivery rate each server sustains\n")
    out.append(f"{ex.get('requested', '—')} connections, {ex.get('keys', '—')} businesses (each order = "
               f"{(ex.get('requested') or 0) // max(ex.get('keys') or 1, 1)} deliveries); steps of "
               f"{ex.get('writer', {}).get('seconds', 0):.0f} s of writing, upwards until one fails (downwards until one passes when the first fails): p99 over "
               f"{ex.get('cap_p99_ms', 100):g} ms, any loss or error, or the writer short of the rate (then the writer is the limit). "
               "One run per step, a fresh server each; sustainable = the delivered rate of the highest step that passed; "
               "the median over the searches (one per run), the other columns from the search with that median. "
               "Load generator busy: its own CPU share from the first write to the end of the drain, at the failing step (else the top step): near 100%, the load generator may be the limit.\n")
    out.append("| server | searches | sustainable deliveries/s | offered there | p99 ms there | server CPU s there (writes + drain) | deliveries per server CPU s there | first failing step (offered) | why | load generator busy (at the failing step, else the top one) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in present:
        searches = []
        for run in sorted({r["run"] for r in by[("cap", s)]}):
            steps = sorted((r for r in by[("cap", s)] if r["run"] == run), key=lambda r: r.get("cap_rate", 0))
            good, bad = None, None
            for r in steps:
                if cap_verdict(r): bad = r; break
                good = r
            searches.append((good.get("events_per_s", 0) if good else 0, good, bad))
        searches.sort(key=lambda x: x[0])
        sus, good, bad = searches[(len(searches) - 1) // 2]
        wcpu = lambda r: sum(v.get("write_cpu_s", 0) for v in r.get("nodes", {}).values()) if r else None
        offered = lambda r: f"{r['cap_step']:g}M" if r else "—"
        why = cap_verdict(bad) if bad else "none: the top step passed"
        # Not the server's limit when no step failed or the writer was: then "at least".
        ceiling = " (at least: no step failed)" if not bad else " (at least: the writer's ceiling)" if why.startswith("writer") else ""
        busy = bad.get("client_busy") if bad else (good.get("client_busy") if good else None)
        out.append(f"| {s} | {len(searches)} | {fmt(float(sus), 0) if good else 'none passed'}{ceiling} | {offered(good)} | "
                   f"{fmt(good.get('p99_ms'), 2) if good else '—'} | {fmt(wcpu(good), 2) if good else '—'} | "
                   f"{fmt(good['received'] / wcpu(good), 0) if good and wcpu(good) else '—'} | {offered(bad)} | {why} | "
                   f"{f'{100 * busy:.0f}%' if busy is not None else '—'} |")

if cluster_only or cap_only:
    cluster_tables() if cluster_only else cap_table()
    print("\n".join(out))
    sys.exit(0)

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
