"""bench/run's workloads: each runs against the servers the harness started and stores its
results as JSON (one file per workload) for report.py. Nothing here asserts a goal; problems
(a server that errs, crashes, answers non-2xx, or drops what a workload holds) are collected
and make bench/run exit non-zero.
"""

import datetime
import json
import os
import re
import shutil
import time
import uuid

from harness import (GATEWAY_B_BIN, GATEWAY_BIN, REPLICAS, ROOT, ROUTE, SERVERS_H1, TARGET,
                     Servers, check_config, cpu_seconds, gateway_config, log, machine_state,
                     metrics, open_files, raise_file_limit, rss_kib, set_affinity, wait_http)
from loadgen import IdleConns, client, h2load, wrk

WORKLOADS = ["cache_hit", "http2", "miss", "coalescing", "storm", "memory", "idle",
             "cache_hit_idle", "cluster"]

# How long the gateway may leave a connection silent or idle in the idle workloads: longer
# than any of them holds one (the full run holds 10,000 for ~15-30 s), so they measure held
# connections, not the timers. The first value the gateway build accepts is used (a build
# may bound its timeouts); its own defaults are shorter.
IDLE_HOLD_TIMEOUTS = ["120s", "60s"]


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.work = os.path.join(TARGET, "bench", "work")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.results_dir = args.results_dir
        os.makedirs(self.results_dir, exist_ok=True)
        self.servers = Servers(self.work)
        self.problems = []
        self.sampler = None
        # One descriptor per idle connection in this process and one in the gateway.
        self.file_limit = raise_file_limit()

    # ---- lifecycle

    def start(self):
        s = self.servers
        s.start_simulator()
        # "gateway" runs as deployed: an access line per request, JSON, into a file (its
        # stderr); "gateway_nolog" is the same build with access lines off.
        s.start_gateway("gateway", access_log="all")
        s.start_gateway("gateway_nolog")
        if GATEWAY_B_BIN:
            s.start_gateway("gateway_b", binary=GATEWAY_B_BIN, access_log="all")
        # The bytes every server answers: the gateway's own answer for the bench task.
        body = wait_http(s.url("gateway", "complete-bench"), s.auth_headers())
        body_file = os.path.join(self.work, "body.json")
        with open(body_file, "wb") as f:
            f.write(body)
        s.start_bare(body_file)
        s.start_nginx()
        for name in ("tuned", "stock", "nocache", "micro"):
            wait_http(s.url(name, "complete-bench"))
        same = {name: wait_http(s.url(name, "complete-bench"), s.auth_headers(name))
                for name in ("bare", "tuned", "stock", "nocache", "direct")}
        for name, b in same.items():
            if b != body:
                self.problems.append(f"{name} answers {len(b)} bytes, not the gateway's "
                                     f"{len(body)} identical bytes")

    def stop(self):
        self.servers.stop()

    def save(self, name, data):
        data["machine_after"] = machine_state()
        if self.sampler:
            data["during"] = self.sampler.summary()
            self.sampler = None
        data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        data["smoke"] = self.smoke
        with open(os.path.join(self.results_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        # The access-logged gateway's log is of no use once a workload is done; it would
        # fill a shared disk over a full run.
        for name in ("gateway", "gateway_b"):
            if name in self.servers.procs.procs:
                self.servers.procs.truncate_log(name)
        dead = self.servers.procs.check_alive()
        if dead:
            raise RuntimeError(f"processes died during {name}: {dead}")

    # ---- workloads

    def cache_hit(self):
        s = self.servers
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        conns_list = [16] if self.smoke else [16, 64]
        modes = ["pinned"] if self.smoke else ["pinned", "unpinned"]
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": []}
        servers = list(SERVERS_H1)
        if GATEWAY_B_BIN:
            servers.insert(1, ("gateway_b", "gateway, build B (BENCH_GATEWAY_B_BIN), JSON "
                                            "access log to a file"))
        if self.args.servers:
            servers = [x for x in servers if x[0] in self.args.servers.split(",")]
        data["servers"] = servers
        for name, _ in servers:  # warm every cache
            wait_http(s.url(name, "complete-bench"), s.auth_headers(name))
        for mode in modes:
            set_affinity(s.all_server_pids(), "0" if mode == "pinned" else "0-1")
            for conns in conns_list:
                for rep in range(reps):
                    # alternate the order each repetition so drift hits all servers alike
                    order = servers if rep % 2 == 0 else list(reversed(servers))
                    for name, _ in order:
                        busy_before = machine_state()["compilers"]
                        cpu_before = cpu_seconds(s.server_pids(name))
                        r = wrk(s.url(name, "complete-bench"), conns, secs,
                                1 if mode == "pinned" else 2, s.wrk_headers(name),
                                cpus="1" if mode == "pinned" else None)
                        r.pop("raw")
                        r["cpu_us_per_req"] = per_request_us(
                            cpu_seconds(s.server_pids(name)) - cpu_before, r["requests"])
                        r["contended"] = bool(busy_before or machine_state()["compilers"])
                        r.update(server=name, conns=conns, mode=mode, rep=rep,
                                 rss_kib=rss_kib(s.server_pids(name)))
                        if name in ("gateway", "gateway_b"):
                            r["log_bytes"] = s.procs.truncate_log(name)
                            r["log_lines_dropped"] = metrics(s.admin[name]).get(
                                "hubspot_gateway_log_lines_dropped_total", 0)
                        log(f"cache_hit {mode} c{conns} rep{rep} {name}: {r['rps']:.0f} req/s "
                            f"p50 {r['p50_us']} us p99 {r['p99_us']} us, server CPU "
                            f"{r['cpu_us_per_req']:.1f} us/req, non2xx {r['non2xx']}")
                        self.check_wrk(f"cache_hit {name} c{conns}", r)
                        data["runs"].append(r)
        set_affinity(s.all_server_pids(), "0-1")
        self.save("cache_hit", data)

    def http2(self):
        s = self.servers
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": [],
                "conns": 16, "streams": 10}
        servers = ["gateway", "bare", "tuned_h2"]
        for rep in range(reps):
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for name in order:
                r = h2load(s.url(name, "complete-bench"), 16, 10, secs, s.wrk_headers(name))
                r.pop("raw")
                r.update(server=name, rep=rep)
                log(f"http2 rep{rep} {name}: {r['rps']:.0f} req/s mean {r['mean_us']} us "
                    f"non2xx {r['non2xx']} failed {r['failed']}")
                if r["non2xx"] or r["failed"]:
                    self.problems.append(f"http2 {name}: non-2xx {r['non2xx']}, failed {r['failed']}")
                data["runs"].append(r)
        self.save("http2", data)

    def miss(self):
        s = self.servers
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        s.sim_latency(0)
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": []}
        for conns in ([1] if self.smoke else [1, 16]):
            for rep in range(reps):
                order = ["gateway", "direct"] if rep % 2 == 0 else ["direct", "gateway"]
                for name in order:
                    before = s.sim_status_requests()
                    r = wrk(s.url(name, "pending-miss"), conns, secs, 1, s.wrk_headers(name))
                    r.pop("raw")
                    r["upstream_calls"] = s.sim_status_requests() - before
                    r.update(server=name, rep=rep, conns=conns)
                    log(f"miss c{conns} rep{rep} {name}: {r['rps']:.0f} req/s p50 {r['p50_us']} "
                        f"p99 {r['p99_us']} upstream {r['upstream_calls']} non2xx {r['non2xx']}")
                    self.check_wrk(f"miss {name}", r)
                    data["runs"].append(r)
        self.save("miss", data)

    def coalescing(self):
        s = self.servers
        waves = 1 if self.smoke else self.args.waves
        sizes = [200] if self.smoke else [200, 2000]
        latency = 200
        s.sim_latency(latency)
        data = {"machine_before": machine_state(), "latency_ms": latency, "runs": []}
        # bare hyper answers at once (no upstream): the machine's floor for answering N
        # simultaneous callers, i.e. what the fan-out alone costs here.
        cases = [("gateway", "pending"), ("gateway", "complete"), ("tuned", "complete"),
                 ("bare", "floor")]
        try:
            for n in sizes:
                for wave in range(waves):
                    for server, kind in cases:
                        task = f"{kind}-wave-{uuid.uuid4().hex[:12]}"
                        # settle: let a late upstream call land in the count
                        r = self.counted_client("wave", s.addr[server], ROUTE.format(task), n,
                                                *s.wrk_headers(server), settle=0.3)
                        r.update(server=server, kind=kind, n=n, wave=wave)
                        log(f"coalescing n{n} wave{wave} {server}/{kind}: upstream "
                            f"{r['upstream_calls']} p50 {r['p50_us']} p99 {r['p99_us']} max "
                            f"{r['max_us']} statuses {r['statuses']} errors {r['errors']}")
                        self.check_client(f"coalescing {server}/{kind} n{n}", r)
                        data["runs"].append(r)
        finally:
            s.sim_latency(0)
        self.save("coalescing", data)

    def storm(self):
        s = self.servers
        secs = 3 if self.smoke else self.args.storm_seconds
        clients, tasks, latency = 1000, 100, 200
        s.start_gateway("gw_micro", pending_ttl="1s")
        s.sim_latency(latency)
        data = {"machine_before": machine_state(), "seconds": secs, "clients": clients,
                "tasks": tasks, "latency_ms": latency, "runs": []}
        cases = [("gateway", "gateway, pending_ttl = 0s (default)"),
                 ("gw_micro", "gateway, pending_ttl = 1s"),
                 ("micro", "nginx, 1 s micro-cache + proxy_cache_lock")]
        try:
            for server, label in cases:
                tag = uuid.uuid4().hex[:8]
                r = self.counted_client("storm", s.addr[server],
                                        ROUTE.format(f"pending-storm-{tag}-{{}}"), clients,
                                        tasks, 1000, secs * 1000, *s.wrk_headers(server))
                r["upstream_per_s"] = r["upstream_calls"] / r["seconds"]
                r["share_within_50ms"] = r["within_50ms"] / max(1, r["answered"])
                r.update(server=server, label=label)
                log(f"storm {server}: {r['answered']} answers, upstream {r['upstream_per_s']:.1f}/s, "
                    f"within 50 ms {r['share_within_50ms']:.1%}, p50 {r['p50_us']} p99 "
                    f"{r['p99_us']} statuses {r['statuses']} errors {r['errors']}")
                self.check_client(f"storm {server}", r)
                data["runs"].append(r)
        finally:
            s.sim_latency(0)
            s.stop_gateway("gw_micro")
        self.save("storm", data)

    def memory(self):
        s = self.servers
        sizes = ["8MiB"] if self.smoke else self.args.memory_sizes
        s.sim_latency(0)
        data = {"machine_before": machine_state(), "runs": []}
        script = os.path.join(ROOT, "bench", "fill.lua")
        parse = {"MiB": 1 << 20, "GiB": 1 << 30}
        for size in sizes:
            max_bytes = int(re.match(r"\d+", size).group(0)) * parse[size[-3:]]
            pid = s.start_gateway("gw_mem", max_bytes=size)
            admin = s.admin["gw_mem"]
            idle_rss = rss_kib([pid])
            t0 = time.time()
            requests = 0
            history = []
            chunk = 2 if self.smoke else 10
            for i in range(400):
                r = wrk(f"http://{s.addr['gw_mem']}/", 32, chunk, 2, s.wrk_headers("gw_mem"),
                        script=script, script_args=[f"{size}-{i}"])
                requests += r["requests"]
                if r["non2xx"]:
                    self.problems.append(f"memory {size}: {r['non2xx']} non-2xx while filling")
                m = metrics(admin)
                w = m["hubspot_gateway_cache_weight_bytes"]
                e = m["hubspot_gateway_cache_entries"]
                history.append({"t": round(time.time() - t0, 1), "requests": requests,
                                "entries": e, "weight": w, "rss_kib": rss_kib([pid]),
                                "fill_rps": r["rps"]})
                log(f"memory {size}: {requests} requests, {e:.0f} entries, "
                    f"{w / 2**20:.1f} MiB weight, RSS {rss_kib([pid]) / 1024:.1f} MiB, "
                    f"{r['rps']:.0f} req/s")
                # full: weight reached the bound and keeps no more entries than a chunk ago
                if w >= 0.97 * max_bytes and len(history) >= 2 and \
                        history[-1]["entries"] <= history[-2]["entries"] * 1.01:
                    break
                if self.smoke and i >= 1:
                    break
                if time.time() - t0 > self.args.memory_limit_s:
                    self.problems.append(f"memory {size}: stopped filling after "
                                         f"{self.args.memory_limit_s} s, cache not full")
                    break
            time.sleep(1)
            m = metrics(admin)
            run = {"size": size, "max_bytes": max_bytes, "idle_rss_kib": idle_rss,
                   "rss_kib": rss_kib([pid]), "hwm_kib": rss_kib([pid], "VmHWM"),
                   "entries": m["hubspot_gateway_cache_entries"],
                   "weight": m["hubspot_gateway_cache_weight_bytes"], "requests": requests,
                   "fill_seconds": round(time.time() - t0, 1), "history": history}
            run["goal_kib"] = (1.3 * max_bytes + 30 * 2**20) / 1024
            data["runs"].append(run)
            s.stop_gateway("gw_mem")
        self.save("memory", data)

    def idle(self):
        """N idle connections held by a fresh gateway, once per kind (silent, keep-alive):
        resident memory per connection, and whether the gateway still answers meanwhile."""
        s = self.servers
        n, data = self.idle_plan(200 if self.smoke else self.args.idle_conns)
        settle = 1 if self.smoke else 5
        data["settle_s"] = settle
        for kind in IdleConns.KINDS:
            pid = s.start_gateway("gw_idle", server_extra=data["settings"])
            idle = IdleConns(s.addr["gw_idle"], kind, ROUTE.format("complete-bench"),
                             s.wrk_headers("gw_idle"))
            try:
                hit_url = s.url("gw_idle", "complete-bench")
                wait_http(hit_url, s.auth_headers("gw_idle"))  # cached from here on
                time.sleep(settle)
                base_rss, base_fds = rss_kib([pid]), open_files(pid)
                t0 = time.time()
                open_s = idle.open(n)
                opened = len(idle.socks)
                accepted = self.wait_open_files(pid, base_fds + opened) - base_fds
                time.sleep(settle)
                held_rss, hwm = rss_kib([pid]), rss_kib([pid], "VmHWM")
                healthz_ms = timed_ms(lambda: wait_http(f"http://{s.admin['gw_idle']}/healthz",
                                                        timeout=10))
                hit_ms = timed_ms(lambda: wait_http(hit_url, s.auth_headers("gw_idle"),
                                                    timeout=10))
                still = idle.still_open()
                held_s = time.time() - t0
                idle.close()
                self.wait_open_files(pid, base_fds, fewer=True)
                time.sleep(settle)
                run = {"kind": kind, "conns": opened, "connect_errors": idle.errors,
                       "statuses": idle.statuses, "open_s": round(open_s, 2),
                       "accepted": accepted, "still_open": still, "held_s": round(held_s, 1),
                       "base_rss_kib": base_rss, "held_rss_kib": held_rss, "hwm_kib": hwm,
                       "after_rss_kib": rss_kib([pid]), "healthz_ms": healthz_ms,
                       "hit_ms": hit_ms,
                       "kib_per_conn": (held_rss - base_rss) / max(1, accepted)}
            finally:
                idle.close()
                s.stop_gateway("gw_idle")
            log(f"idle {kind}: {opened} opened in {open_s:.1f} s, {accepted} accepted, "
                f"{still} still open after {held_s:.0f} s; RSS {base_rss / 1024:.1f} -> "
                f"{held_rss / 1024:.1f} MiB ({run['kib_per_conn']:.1f} KiB per connection), "
                f"{run['after_rss_kib'] / 1024:.1f} MiB after closing; /healthz {healthz_ms:.1f} "
                f"ms, a cache hit {hit_ms:.1f} ms while held")
            self.check_held(f"idle {kind}", n, opened, accepted, still, idle)
            if kind == "keepalive" and set(idle.statuses) != {"200"}:
                self.problems.append(f"idle keepalive: statuses {idle.statuses}")
            data["runs"].append(run)
        self.save("idle", data)

    def cache_hit_idle(self):
        """Cache-hit throughput of one gateway with and without N idle keep-alive
        connections open beside the load, alternated; pinned like cache_hit's first rows."""
        s = self.servers
        n, data = self.idle_plan(100 if self.smoke else self.args.idle_beside)
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        data.update(seconds=secs, reps=reps)
        pid = s.start_gateway("gw_idle", server_extra=data["settings"])
        url, headers = s.url("gw_idle", "complete-bench"), s.wrk_headers("gw_idle")
        wait_http(url, s.auth_headers("gw_idle"))
        set_affinity([pid], "0")
        try:
            for conns in ([16] if self.smoke else [16, 64]):
                for rep in range(reps):
                    order = ["without", "with"] if rep % 2 == 0 else ["with", "without"]
                    for case in order:
                        idle_n = n if case == "with" else 0
                        data["runs"].append(self.hit_beside_idle(pid, url, headers, conns, secs,
                                                                 rep, idle_n))
        finally:
            s.stop_gateway("gw_idle")
        self.save("cache_hit_idle", data)

    def cluster(self):
        """Cluster mode: three replicas sharing one redis-server, beside one gateway of the
        same config without `[cluster]`. Waves of callers of one new PENDING task spread over
        the replicas (upstream calls per wave, p99 against the upstream latency); the miss path
        (1 connection, a PENDING task, zero upstream latency) and the cache hit (pinned like
        cache_hit) on one replica against the lone gateway, alternated."""
        s = self.servers
        waves = 1 if self.smoke else self.args.waves
        n = 30 if self.smoke else 300
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        latency = 200
        s.start_redis()
        # The production defaults but the prefix: a fresh one per run.
        cluster = {"redis_url": f"redis://{s.addr['redis']}",
                   "key_prefix": f"bench-{uuid.uuid4().hex[:8]}:"}
        data = {"machine_before": machine_state(), "latency_ms": latency, "n": n,
                "seconds": secs, "reps": reps, "cluster": cluster, "waves": [], "miss": [],
                "hit": []}
        try:
            for name in REPLICAS:
                s.start_gateway(name, cluster=cluster)
            s.start_gateway("gw_single")
            s.sim_latency(latency)
            addrs = ",".join(s.addr[name] for name in REPLICAS)
            for wave in range(waves):
                task = f"pending-cluster-wave-{uuid.uuid4().hex[:12]}"
                r = self.counted_client("wave", addrs, ROUTE.format(task), n,
                                        *s.wrk_headers("gw_r0"), settle=0.3)
                r.update(wave=wave)
                log(f"cluster wave{wave} n{n} over {len(REPLICAS)} replicas: upstream "
                    f"{r['upstream_calls']} p50 {r['p50_us']} p99 {r['p99_us']} max "
                    f"{r['max_us']} statuses {r['statuses']} errors {r['errors']}")
                self.check_client(f"cluster wave {wave}", r)
                data["waves"].append(r)
            s.sim_latency(0)
            pair = ["gw_r0", "gw_single"]
            for rep in range(reps):
                for name in (pair if rep % 2 == 0 else pair[::-1]):
                    before = s.sim_status_requests()
                    r = wrk(s.url(name, f"pending-cluster-miss-{name}"), 1, secs, 1,
                            s.wrk_headers(name))
                    r.pop("raw")
                    r.update(server=name, rep=rep, upstream_calls=s.sim_status_requests() - before)
                    log(f"cluster miss rep{rep} {name}: {r['rps']:.0f} req/s p50 {r['p50_us']} "
                        f"p99 {r['p99_us']} upstream {r['upstream_calls']} non2xx {r['non2xx']}")
                    self.check_wrk(f"cluster miss {name}", r)
                    data["miss"].append(r)
            for name in pair:
                wait_http(s.url(name, "complete-bench"), s.auth_headers(name))
            pids = [s.procs.pid(name) for name in pair]
            set_affinity(pids, "0")
            try:
                for rep in range(reps):
                    for name in (pair if rep % 2 == 0 else pair[::-1]):
                        busy_before = machine_state()["compilers"]
                        r = wrk(s.url(name, "complete-bench"), 16, secs, 1, s.wrk_headers(name),
                                cpus="1")
                        r.pop("raw")
                        r["contended"] = bool(busy_before or machine_state()["compilers"])
                        r.update(server=name, rep=rep)
                        log(f"cluster hit rep{rep} {name}: {r['rps']:.0f} req/s p50 "
                            f"{r['p50_us']} us p99 {r['p99_us']} us non2xx {r['non2xx']}")
                        self.check_wrk(f"cluster hit {name}", r)
                        data["hit"].append(r)
            finally:
                set_affinity(pids, "0-1")
            # Whether the replicas used Redis all along or fell back (a call past `timeout`).
            data["replica_metrics"] = {name: metrics(s.admin[name]) for name in REPLICAS}
        finally:
            s.sim_latency(0)
            for name in (*REPLICAS, "gw_single"):
                s.stop_gateway(name)
            s.procs.stop("redis")
        self.save("cluster", data)

    def counted_client(self, *args, settle=0.0):
        """One bench-client run, its wall time, and the upstream calls the simulator counted
        from its start until `settle` seconds after it."""
        before = self.servers.sim_status_requests()
        t0 = time.time()
        r = client(*args)
        r["wall_s"] = time.time() - t0
        time.sleep(settle)
        r["upstream_calls"] = self.servers.sim_status_requests() - before
        return r

    # ---- pieces of the idle workloads

    def idle_plan(self, wanted):
        """How many idle connections this machine allows (this process and the gateway each
        hold one descriptor per connection, under the same file limit), and the [server]
        settings that let the gateway hold them while they are measured: the timeouts
        longer than the workload, the connection cap above N. Keys or values this gateway
        build refuses (its `check-config` says why) are left at its defaults and reported."""
        n = min(wanted, self.file_limit - 1000)
        if n < wanted:
            log(f"idle: file limit {self.file_limit} allows {n} connections, not {wanted}")
        wish = {"header_read_timeout": IDLE_HOLD_TIMEOUTS, "idle_timeout": IDLE_HOLD_TIMEOUTS,
                "max_connections": [n + 1000]}
        settings, refused = {}, {}
        for key, values in wish.items():
            for value in values:
                path = os.path.join(self.work, f"probe-{key}.toml")
                gateway_config(path, self.servers.addr["direct"],
                               server_extra={**settings, key: value})
                ok, message = check_config(GATEWAY_BIN, path)
                if ok:
                    settings[key] = value
                    refused.pop(key, None)
                    break
                last = message.splitlines()[-1] if message else "refused"
                refused[key] = last.split(", expected one of")[0]
                log(f"idle: this gateway refuses server.{key} = {value!r}: {refused[key]}")
        return n, {"machine_before": machine_state(), "wanted": wanted, "n": n,
                   "file_limit": self.file_limit, "settings": settings, "refused": refused,
                   "runs": []}

    def hit_beside_idle(self, pid, url, headers, conns, secs, rep, n):
        """One wrk run on the gateway's cache hit with n idle keep-alive connections held
        (n = 0: none), pinned: the gateway on CPU 0, wrk on CPU 1."""
        s = self.servers
        idle = IdleConns(s.addr["gw_idle"], "keepalive", ROUTE.format("complete-bench"),
                         headers)
        base_fds = open_files(pid)
        try:
            idle.open(n)
            opened = len(idle.socks)
            accepted = self.wait_open_files(pid, base_fds + opened) - base_fds
            busy_before = machine_state()["compilers"]
            cpu_before = cpu_seconds([pid])
            r = wrk(url, conns, secs, 1, headers, cpus="1")
            r.pop("raw")
            r["cpu_us_per_req"] = per_request_us(cpu_seconds([pid]) - cpu_before, r["requests"])
            r["contended"] = bool(busy_before or machine_state()["compilers"])
            still = idle.still_open()
        finally:
            idle.close()
        self.wait_open_files(pid, base_fds, fewer=True)
        r.update(idle=n, conns=conns, rep=rep, accepted=accepted, still_open=still,
                 rss_kib=rss_kib([pid]))
        log(f"cache_hit_idle c{conns} rep{rep} idle {n}: {r['rps']:.0f} req/s p50 "
            f"{r['p50_us']} us p99 {r['p99_us']} us, gateway CPU {r['cpu_us_per_req']:.1f} "
            f"us/req, non2xx {r['non2xx']}; idle connections "
            f"still open {still} of {opened}")
        self.check_wrk(f"cache_hit_idle c{conns} idle {n}", r)
        if n:
            self.check_held(f"cache_hit_idle c{conns} rep{rep}", n, opened, accepted, still,
                            idle)
            if set(idle.statuses) != {"200"}:
                self.problems.append(f"cache_hit_idle: idle connections' statuses "
                                     f"{idle.statuses}")
        return r

    def wait_open_files(self, pid, target, fewer=False, timeout=30):
        """Waits until the gateway holds at least (or, `fewer`, at most) `target` descriptors,
        i.e. has accepted (or let go of) the connections; returns the last count."""
        deadline = time.time() + timeout
        while True:
            count = open_files(pid)
            if (count <= target if fewer else count >= target) or time.time() > deadline:
                return count
            time.sleep(0.05)

    # ---- what counts as a problem

    def check_wrk(self, what, r):
        if r["non2xx"] or r["socket_errors"]:
            self.problems.append(f"{what}: {r['non2xx']} non-2xx, socket errors "
                                 f"{r['socket_errors']!r}")

    def check_client(self, what, r):
        if r["errors"] or set(r["statuses"]) != {"200"}:
            self.problems.append(f"{what}: statuses {r['statuses']}, errors {r['errors']}")

    def check_held(self, what, wanted, opened, accepted, still, idle):
        """The workload measured what it says only if every connection was opened, accepted,
        and still open when it was measured."""
        if idle.errors or opened < wanted:
            self.problems.append(f"{what}: {opened} of {wanted} connections opened "
                                 f"({idle.errors} connect errors)")
        if accepted < opened or still < opened:
            self.problems.append(f"{what}: of {opened} connections the gateway accepted "
                                 f"{accepted}, and {still} were still open when measured "
                                 "(a cap or a timeout shorter than the workload)")


def per_request_us(cpu_s, requests):
    return cpu_s / max(1, requests) * 1e6


def timed_ms(f):
    t = time.time()
    f()
    return (time.time() - t) * 1000
