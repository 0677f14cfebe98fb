"""bench/run's report: docs/benchmarks.md (and the cache-hit chart) written from the JSON
results the workloads stored, so any subset can be rerun and the report regenerated.
"""

import json
import os
import statistics
import textwrap

from harness import SERVERS_H1, log


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_us(us):
    if us is None:
        return "–"
    if us >= 10_000:
        return f"{us / 1000:.0f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def cpu_per_req(rs):
    """The median server CPU per request of runs that recorded it."""
    xs = [x["cpu_us_per_req"] for x in rs if "cpu_us_per_req" in x]
    return f"{med(xs):.1f} µs" if xs else "–"


def load_line(d):
    b, a = d["machine_before"], d["machine_after"]
    c = max(b["compilers"], a["compilers"])
    who = ", ".join(sorted(set(b["compiler_names"]) | set(a["compiler_names"])))
    flag = f" — **contended: {c} compiler processes ({who}) seen**" if c else ""
    du = d.get("during")
    if du:
        flag = (f"; during it, 1-min load {du['load1_min']:.2f}–{du['load1_max']:.2f}, "
                f"other compilers running in {du['busy_samples']} of {du['samples']} one-second "
                f"samples")
        if du["busy_samples"]:
            flag += f" ({', '.join(du['busy_names'])}) — **contended: not clean figures**"
        else:
            flag += " (clean)"
        if "steal" in du:
            flag += f"; CPU time taken by the hypervisor (steal): {du['steal'] * 100:.1f} %"
    return (f"_Run {d['finished']}{' (smoke)' if d.get('smoke') else ''}; load average before "
            f"{b['loadavg']}, after {a['loadavg']}{flag}._")


def section_cache_hit(d, add, goals, chart_png):
    add("## 1. Cache hit: one terminal task (~1.1 KB body), HTTP/1.1 keep-alive (wrk)")
    add("")
    add(load_line(d))
    add("")
    add(f"Medians of {d['reps']} runs of {d['seconds']} s each, servers alternated. "
        "Pinned: every server process on CPU 0, wrk (1 thread) on CPU 1. Unpinned: no "
        "affinity, wrk with 2 threads. RSS is the server's resident memory after its run "
        "(nginx: master + workers, one nginx serves all nginx rows; simulator for the direct "
        "row).")
    add("")
    add("*CPU/req* is the server's CPU time (user + system, all its threads, from /proc) "
        "during the run divided by the requests answered: what a request costs the server, "
        "a figure that other processes on the machine move far less than req/s. The last "
        "column counts the runs of that row that began or ended while another compiler was "
        "running (not clean).")
    add("")
    add("| server | mode | conns | req/s | p50 | p99 | CPU/req | RSS | vs bare hyper | "
        "contended runs |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    agg = {}
    for r in d["runs"]:
        agg.setdefault((r["mode"], r["conns"], r["server"]), []).append(r)
    combos = sorted({(m, c) for m, c, _ in agg}, key=lambda x: (x[0] != "pinned", x[1]))
    chart, chart_busy = {}, set()
    for mode, conns in combos:
        bare = med(x["rps"] for x in agg.get((mode, conns, "bare"), []))
        for server, label in d.get("servers", SERVERS_H1):
            rs = agg.get((mode, conns, server))
            if not rs:
                continue
            rps = med(x["rps"] for x in rs)
            ratio = f"{rps / bare:.2f}" if bare else "–"
            chart.setdefault((mode, conns), []).append((label, rps))
            if any(x.get("contended") for x in rs):
                chart_busy.add((mode, conns))
            busy = (f"{sum(1 for x in rs if x['contended'])} of {len(rs)}"
                    if all("contended" in x for x in rs) else "not recorded")
            add(f"| {label} | {mode} | {conns} | {rps:,.0f} | "
                f"{fmt_us(med(x['p50_us'] for x in rs))} | "
                f"{fmt_us(med(x['p99_us'] for x in rs))} | {cpu_per_req(rs)} | "
                f"{med(x['rss_kib'] for x in rs) / 1024:.1f} MiB | {ratio} | {busy} |")
            if server == "gateway" and bare:
                goals.append((f"cache hit ≥ 0.9 × bare hyper ({mode}, {conns} conns)",
                              f"{rps / bare:.2f} × ({rps:,.0f} vs {bare:,.0f} req/s)",
                              rps / bare >= 0.9))
    add("")
    add("![cache-hit req/s per server](benchmarks-cache-hit.png)")
    add("")
    if chart_png:
        draw_chart(chart, chart_png, chart_busy)


def section_http2(d, add, goals, chart_png):
    add("## 1b. Cache hit over HTTP/2 (h2c, h2load)")
    add("")
    add(load_line(d))
    add("")
    add(f"h2load, {d['conns']} connections × {d['streams']} concurrent streams, 1 thread, "
        f"{d['seconds']} s after 1 s warm-up; medians of {d['reps']} runs; unpinned. h2load "
        "reports mean latency, not percentiles.")
    add("")
    add("| server | req/s | mean latency |")
    add("|---|---:|---:|")
    names = {"gateway": "gateway", "bare": "bare hyper", "tuned_h2": "nginx tuned cache (h2c)"}
    for s in ("gateway", "bare", "tuned_h2"):
        rs = [r for r in d["runs"] if r["server"] == s]
        if rs:
            add(f"| {names[s]} | {med(r['rps'] for r in rs):,.0f} | "
                f"{fmt_us(med(r['mean_us'] for r in rs))} |")
    add("")


def section_miss(d, add, goals, chart_png):
    add("## 2. Miss path: a PENDING task, pending_ttl = 0s, simulator at zero latency")
    add("")
    add(load_line(d))
    add("")
    add(f"wrk, 1 thread, unpinned, medians of {d['reps']} runs of {d['seconds']} s, "
        "gateway and direct alternated. Every gateway request is a miss (PENDING is not "
        "cached); with 16 connections on one task some callers are coalesced, so the "
        "upstream-call column differs from the request count.")
    add("")
    add("| conns | path | req/s | p50 | p99 | upstream calls / requests |")
    add("|---:|---|---:|---:|---:|---:|")
    for conns in sorted({r["conns"] for r in d["runs"]}):
        row = {}
        for s in ("direct", "gateway"):
            rs = [r for r in d["runs"] if r["server"] == s and r["conns"] == conns]
            row[s] = (med(r["p50_us"] for r in rs), med(r["p99_us"] for r in rs))
            calls = sum(r["upstream_calls"] for r in rs)
            reqs = sum(r["requests"] for r in rs)
            add(f"| {conns} | {'simulator directly' if s == 'direct' else 'through the gateway'}"
                f" | {med(r['rps'] for r in rs):,.0f} | {fmt_us(row[s][0])} | "
                f"{fmt_us(row[s][1])} | {calls:,} / {reqs:,} |")
        dp50 = row["gateway"][0] - row["direct"][0]
        dp99 = row["gateway"][1] - row["direct"][1]
        add(f"| {conns} | **added by the gateway** | | **{fmt_us(dp50)}** | **{fmt_us(dp99)}** | |")
        if conns == 1:
            goals.append(("miss path adds ≤ 100 µs p50 (1 conn)", fmt_us(dp50), dp50 <= 100))
            goals.append(("miss path adds ≤ 1 ms p99 (1 conn)", fmt_us(dp99), dp99 <= 1000))
    add("")


def section_coalescing(d, add, goals, chart_png):
    add(f"## 3. Coalescing: N callers of one new task at once, upstream latency {d['latency_ms']} ms")
    add("")
    add(load_line(d))
    add("")
    add("`bench-client wave`: N connections opened first, then one GET each released "
        "together; latency per caller from its own write to the answer's last byte. "
        "`pending-wave-*` is a PENDING task (not cached by anyone: only coalescing can "
        "help); `complete-wave-*` is the first request of a new cacheable task, the only "
        "case nginx's proxy_cache_lock applies to, so the nginx comparison uses it. "
        "Upstream calls counted by the simulator per wave. Figures: median over waves. "
        "The bare hyper row answers from memory at once: the time this machine needs to "
        "answer N simultaneous callers at all (client and server share the 2 cores).")
    add("")
    add("| N | server | task | upstream calls per wave | p50 | p99 | max | send spread |")
    add("|---:|---|---|---:|---:|---:|---:|---:|")
    keyf = lambda r: (r["n"], r["server"], r["kind"])  # noqa: E731
    groups = {}
    for r in d["runs"]:
        groups.setdefault(keyf(r), []).append(r)
    order = {"gateway": 0, "tuned": 1, "bare": 2}
    for (n, server, kind), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], order[kv[0][1]], kv[0][2] != "pending")):
        calls = [r["upstream_calls"] for r in rs]
        name = {"gateway": "gateway", "tuned": "nginx proxy_cache_lock",
                "bare": "bare hyper, no upstream (fan-out floor)"}[server]
        add(f"| {n:,} | {name} | {kind} | {', '.join(map(str, calls))} | "
            f"{fmt_us(med(r['p50_us'] for r in rs))} | {fmt_us(med(r['p99_us'] for r in rs))}"
            f" | {fmt_us(med(r['max_us'] for r in rs))} | "
            f"{fmt_us(med(r['send_spread_us'] for r in rs))} |")
        if server == "gateway":
            limit = (d["latency_ms"] + 10) * 1000
            goals.append((f"coalescing, gateway, {kind}, N={n}: one upstream call per wave",
                          f"{calls}", all(c == 1 for c in calls)))
            p99 = med(r["p99_us"] for r in rs)
            goals.append((f"coalescing, gateway, {kind}, N={n}: p99 ≤ upstream + 10 ms",
                          fmt_us(p99), p99 <= limit))
    add("")


def section_storm(d, add, goals, chart_png):
    add(f"## 4. Polling storm: {d['clients']:,} clients polling {d['tasks']} in-flight tasks "
        f"every second for {d['seconds']} s, upstream latency {d['latency_ms']} ms")
    add("")
    add(load_line(d))
    add("")
    add("`bench-client storm`: each client on its own keep-alive connection polls task "
        "(i mod 100) once a second, clients spread evenly over the second. PENDING tasks.")
    add("")
    add("| server | polls answered | upstream calls / s | distinct tasks / s | answered ≤ 50 ms | p50 | p99 |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for r in d["runs"]:
        add(f"| {r['label']} | {r['answered']:,} | {r['upstream_per_s']:.1f} | {d['tasks']} | "
            f"{r['share_within_50ms']:.1%} | {fmt_us(r['p50_us'])} | {fmt_us(r['p99_us'])} |")
        if r["server"] in ("gateway", "gw_micro"):
            goals.append((f"storm, {r['label']}: upstream calls/s ≤ {d['tasks']}",
                          f"{r['upstream_per_s']:.1f}/s", r["upstream_per_s"] <= d["tasks"]))
    add("")


def section_memory(d, add, goals, chart_png):
    add("## 5. Memory: resident memory with the cache full")
    add("")
    add(load_line(d))
    add("")
    add("A fresh gateway per size; wrk (`bench/fill.lua`, 32 connections) asks for distinct "
        "`complete-*` ids (~1.1 KB answers) in 10 s chunks until the cache weight reaches "
        "the bound and the entry count stops growing (evictions). RSS from "
        "/proc/PID/status; entries and weight from /metrics. Goal: RSS ≤ 1.3 × max_bytes + "
        "30 MiB.")
    add("")
    add("| max_bytes | requests | fill time | entries | weight (bytes stored) | RSS idle | RSS full | peak RSS (VmHWM) | RSS / weight | goal | |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in d["runs"]:
        ok = r["rss_kib"] <= r["goal_kib"]
        add(f"| {r['size']} | {r['requests']:,} | {r['fill_seconds']} s | {r['entries']:,.0f} | "
            f"{r['weight'] / 2**20:.1f} MiB | {r['idle_rss_kib'] / 1024:.1f} MiB | "
            f"{r['rss_kib'] / 1024:.1f} MiB | {r['hwm_kib'] / 1024:.1f} MiB | "
            f"{r['rss_kib'] * 1024 / max(1, r['weight']):.2f} | "
            f"≤ {r['goal_kib'] / 1024:.0f} MiB | {'met' if ok else 'missed'} |")
        goals.append((f"memory at {r['size']}: RSS ≤ 1.3 × max_bytes + 30 MiB",
                      f"{r['rss_kib'] / 1024:.1f} MiB vs ≤ {r['goal_kib'] / 1024:.0f} MiB", ok))
    add("")


def settings_line(d):
    """The [server] settings the idle workloads ran the gateway with, and those this gateway
    build refused (then its defaults applied, and the figures may be cut short by them)."""
    done = ", ".join(f"`server.{k} = {json.dumps(v)}`" for k, v in d["settings"].items())
    line = f"Gateway settings for this workload: {done or 'none accepted'}."
    if d["refused"]:
        line += " Refused by this build, so left at its defaults: " + "; ".join(
            f"`server.{k}` ({why})" for k, why in d["refused"].items()) + "."
    if d["n"] < d["wanted"]:
        line += (f" The file limit ({d['file_limit']:,}) allowed {d['n']:,} connections, "
                 f"not {d['wanted']:,}.")
    return line


def section_idle(d, add, goals, chart_png):
    add(f"## 6. Idle connections held: {d['n']:,} at once, silent or idle on keep-alive")
    add("")
    add(load_line(d))
    add("")
    add("A fresh gateway per kind. *silent*: TCP connections opened and never written to (a "
        "client that has not sent its request yet). *keep-alive*: one cache-hit GET answered "
        "on each, then nothing (a client between polls). RSS from /proc/PID/status once the "
        "gateway holds a descriptor for every connection and after "
        f"{d['settle_s']} s more; per connection = (held − before) / accepted. *Still open* is "
        "checked at the end of the hold: a connection the gateway closed meanwhile (a cap or "
        "a timeout) is missing there and makes the run a problem. /healthz and one cache hit, "
        "each on a new connection, are timed while the connections are held.")
    add("")
    add(settings_line(d) + " The timeouts are longer than the hold on purpose: this measures "
        "what held connections cost. " + (
            "In production the gateway closes a connection idle for `server.idle_timeout` "
            "(default 60 s) and one that sends no request head within "
            "`server.header_read_timeout`." if "idle_timeout" in d["settings"] else
            "This build has no idle timeout: it holds an idle connection until the client "
            "leaves."))
    add("")
    add("| kind | connections | accepted | still open | held for | RSS before | RSS held | "
        "per connection | RSS after closing | /healthz | cache hit |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in d["runs"]:
        add(f"| {r['kind']} | {r['conns']:,} | {r['accepted']:,} | {r['still_open']:,} | "
            f"{r['held_s']} s | {r['base_rss_kib'] / 1024:.1f} MiB | "
            f"{r['held_rss_kib'] / 1024:.1f} MiB | {r['kib_per_conn']:.1f} KiB | "
            f"{r['after_rss_kib'] / 1024:.1f} MiB | {r['healthz_ms']:.1f} ms | "
            f"{r['hit_ms']:.1f} ms |")
    add("")


def section_cache_hit_idle(d, add, goals, chart_png):
    add(f"## 7. Cache hit beside {d['n']:,} idle keep-alive connections")
    add("")
    add(load_line(d))
    add("")
    add(f"One gateway; wrk (1 thread, on CPU 1; the gateway on CPU 0) asks for the cached "
        f"task, alternately without and with {d['n']:,} idle keep-alive connections (each "
        "answered one GET first) held open through the run; medians of "
        f"{d['reps']} runs of {d['seconds']} s. Goal: with them ≥ 0.9 × without.")
    add("")
    add(settings_line(d))
    add("")
    add("| conns | idle connections | req/s | p50 | p99 | CPU/req | RSS | contended runs |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for conns in sorted({r["conns"] for r in d["runs"]}):
        rps = {}
        for idle in (0, d["n"]):
            rs = [r for r in d["runs"] if r["conns"] == conns and r["idle"] == idle]
            if not rs:
                continue
            rps[idle] = med(r["rps"] for r in rs)
            add(f"| {conns} | {idle:,} | {rps[idle]:,.0f} | "
                f"{fmt_us(med(r['p50_us'] for r in rs))} | "
                f"{fmt_us(med(r['p99_us'] for r in rs))} | {cpu_per_req(rs)} | "
                f"{med(r['rss_kib'] for r in rs) / 1024:.1f} MiB | "
                f"{sum(1 for r in rs if r['contended'])} of {len(rs)} |")
        if rps.get(0) and d["n"] in rps:
            ratio = rps[d["n"]] / rps[0]
            add(f"| {conns} | **with / without** | **{ratio:.2f}** | | | | | |")
            goals.append((f"cache hit beside {d['n']:,} idle connections ≥ 0.9 × without "
                          f"({conns} conns)",
                          f"{ratio:.2f} × ({rps[d['n']]:,.0f} vs {rps[0]:,.0f} req/s)",
                          ratio >= 0.9))
    add("")


def section_cluster(d, add, goals, chart_png):
    add("## 8. Cluster mode: three replicas and one redis-server on loopback")
    add("")
    add(load_line(d))
    add("")
    add(f"Three gateway replicas with `[cluster]` at its defaults (Redis call `timeout` 50 ms) "
        "share one redis-server (no persistence); `gw_single` is the same config without "
        "`[cluster]`. Everything, the load included, shares the 2 cores, so these are "
        "contended figures by construction.")
    add("")
    lat = d["latency_ms"]
    waves = d["waves"]
    if waves:
        calls = [w["upstream_calls"] for w in waves]
        p99 = med(w["p99_us"] for w in waves)
        add(f"**Waves**: `bench-client wave` with {d['n']} callers of one new PENDING task, "
            f"connections spread evenly over the 3 replicas, released together; upstream "
            f"latency {lat} ms; upstream calls counted by the simulator per wave.")
        add("")
        add("| waves | upstream calls per wave | p50 | p99 | max | send spread | p99 − upstream |")
        add("|---:|---|---:|---:|---:|---:|---:|")
        add(f"| {len(waves)} | {', '.join(map(str, calls))} | "
            f"{fmt_us(med(w['p50_us'] for w in waves))} | {fmt_us(p99)} | "
            f"{fmt_us(med(w['max_us'] for w in waves))} | "
            f"{fmt_us(med(w['send_spread_us'] for w in waves))} | {fmt_us(p99 - lat * 1000)} |")
        add("")
        goals.append((f"cluster, {d['n']} callers over 3 replicas: one upstream call per wave",
                      f"{calls}", all(c == 1 for c in calls)))
        goals.append((f"cluster, {d['n']} callers over 3 replicas: p99 ≤ upstream + 20 ms",
                      fmt_us(p99), p99 <= (lat + 20) * 1000))
    if d["miss"]:
        add(f"**Miss path**: wrk, 1 connection, a PENDING task (every request asks the "
            f"simulator, at zero latency), medians of {d['reps']} runs of {d['seconds']} s, "
            "alternated.")
        add("")
        add("| gateway | req/s | p50 | p99 | upstream calls / requests |")
        add("|---|---:|---:|---:|---:|")
        by = cluster_rows(add, d["miss"], lambda rs: [
            f"{sum(r['upstream_calls'] for r in rs):,} / {sum(r['requests'] for r in rs):,}"])
        added = med(r["p50_us"] for r in by["gw_r0"]) - med(r["p50_us"] for r in by["gw_single"])
        add(f"| **added by Redis** | | **{fmt_us(added)}** | | |")
        add("")
        goals.append(("cluster miss path adds ≤ 300 µs p50 over a lone replica", fmt_us(added),
                      added <= 300))
    if d["hit"]:
        add(f"**Cache hit**: wrk, 16 connections, the gateways on CPU 0 and wrk on CPU 1, "
            f"medians of {d['reps']} runs of {d['seconds']} s, alternated.")
        add("")
        add("| gateway | req/s | p50 | p99 | contended runs |")
        add("|---|---:|---:|---:|---:|")
        by = cluster_rows(add, d["hit"], lambda rs: [
            f"{sum(1 for r in rs if r['contended'])} of {len(rs)}"])
        rps = {name: med(r["rps"] for r in rs) for name, rs in by.items()}
        ratio = rps["gw_r0"] / rps["gw_single"] if rps["gw_single"] else 0.0
        add("")
        goals.append(("cluster cache hit ≥ 0.95 × lone gateway",
                      f"{ratio:.2f} × ({rps['gw_r0']:,.0f} vs {rps['gw_single']:,.0f} req/s)",
                      ratio >= 0.95))
    state = d.get("replica_metrics") or {}
    if state:
        rows = []
        for name, m in sorted(state.items()):
            up = m.get("hubspot_gateway_cluster_backend_up")
            fallbacks = sum(v for k, v in m.items()
                            if k.startswith("hubspot_gateway_cluster_local_fallbacks_total"))
            timeouts = sum(v for k, v in m.items()
                           if k.startswith("hubspot_gateway_cluster_redis_calls_total")
                           and 'result="timeout"' in k)
            rows.append(f"{name}: backend_up {up:.0f}, Redis timeouts {timeouts:.0f}, "
                        f"operations done locally {fallbacks:.0f}" if up is not None
                        else f"{name}: no cluster metrics")
        add("Replicas at the end: " + "; ".join(rows) + ".")
        add("")


def cluster_rows(add, runs, last):
    """One row per gateway of the cluster workload's pair (the lone gateway first): req/s,
    p50 and p99 medians, then the cells `last(runs)` gives; returns the runs by gateway."""
    names = {"gw_single": "lone gateway, no `[cluster]`", "gw_r0": "one cluster replica"}
    by = {}
    for name, label in names.items():
        rs = by[name] = [r for r in runs if r["server"] == name]
        cells = [f"{med(r['rps'] for r in rs):,.0f}", fmt_us(med(r["p50_us"] for r in rs)),
                 fmt_us(med(r["p99_us"] for r in rs)), *last(rs)]
        add(f"| {label} | {' | '.join(cells)} |")
    return by


# (workload, section writer, its heading's number, the start of its goals' labels)
SECTIONS = [
    ("cache_hit", section_cache_hit, "1.", "cache hit ≥"),
    ("http2", section_http2, "1b.", None),
    ("miss", section_miss, "2.", "miss path"),
    ("coalescing", section_coalescing, "3.", "coalescing,"),
    ("storm", section_storm, "4.", "storm,"),
    ("memory", section_memory, "5.", "memory at"),
    ("idle", section_idle, "6.", None),
    ("cache_hit_idle", section_cache_hit_idle, "7.", "cache hit beside"),
    ("cluster", section_cluster, "8.", "cluster"),
]


def previous_report(path):
    """The numbered sections (by number: their lines) and the goal rows of the report at
    `path`, so a workload without stored results here (`--only` on a fresh checkout) keeps
    what the last run of it wrote instead of vanishing."""
    sections, goals, current = {}, [], None
    if not os.path.exists(path):
        return sections, goals
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("## "):
            number = line.split()[1]
            current = number if number[0].isdigit() else None
            if current:
                sections[current] = []
        elif line.startswith("| ") and current is None and line.endswith(" |"):
            cells = [c.strip() for c in line[2:-2].split(" | ")]
            if len(cells) == 3 and cells[2] in ("met", "**missed**"):
                goals.append((cells[0], cells[1], cells[2] == "met"))
            continue
        if current:
            sections[current].append(line)
    return sections, goals


def report(results_dir, out_md, chart_png, notes_file):
    def load(name):
        p = os.path.join(results_dir, f"{name}.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    lines = []
    add = lines.append
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    add("# Benchmarks")
    add("")
    add("Generated by `bench/run` (see bench/report.py) from the results of its last full run "
        "of each workload (a workload not run from this checkout keeps the section and goals "
        "its last run wrote); the prose after the tables is `bench/notes.md`. "
        f"Machine: {os.cpu_count()} cores ({cpu}), Linux {os.uname().release}, "
        f"wrk and h2load on loopback. Ratios and goals compare figures from the same run.")
    add("")
    goals = []
    kept, kept_goals = previous_report(out_md)
    for name, section, number, goal_prefix in SECTIONS:
        d = load(name)
        if d:
            section(d, add, goals, chart_png)
        elif number in kept:
            log(f"{name}: no stored results; its section is kept from {out_md}")
            lines.extend(kept[number])
            goals.extend(g for g in kept_goals if goal_prefix and g[0].startswith(goal_prefix))

    if goals:
        add("## Goals")
        add("")
        add("| goal | measured | |")
        add("|---|---|---|")
        for g, m, ok in goals:
            add(f"| {g} | {m} | {'met' if ok else '**missed**'} |")
        add("")
    if notes_file and os.path.exists(notes_file):
        with open(notes_file) as f:
            add(f.read().rstrip())
        add("")
    os.makedirs(os.path.dirname(out_md), exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(lines))
    log(f"wrote {out_md}")


def draw_chart(chart, path, busy=()):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return
    combos = list(chart)
    servers = [label for label, _ in chart[combos[0]]]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / len(combos)
    for i, combo in enumerate(combos):
        vals = dict(chart[combo])
        note = " (some runs contended)" if combo in busy else ""
        xs = [j + i * width for j in range(len(servers))]
        ax.bar(xs, [vals.get(s, 0) / 1000 for s in servers], width,
               label=f"{combo[0]}, {combo[1]} conns{note}")
    ax.set_xticks([j + width * (len(combos) - 1) / 2 for j in range(len(servers))])
    ax.set_xticklabels(["\n".join(textwrap.wrap(s, 22)) for s in servers], fontsize=8)
    ax.set_ylabel("thousand requests / s (median)")
    ax.set_title("Cache hit, ~1.1 KB terminal status body, HTTP/1.1 keep-alive, wrk, 2 cores")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")

