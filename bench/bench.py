#!/usr/bin/env python3
"""bench/run's driver: starts everything on loopback, runs the workloads of issue 6, stores
each workload's results as JSON, and writes docs/benchmarks.md (+ the chart) from them.

Run it through bench/run, which installs the tools and builds the binaries first.
Benchmarks are never timed tests: nothing here asserts a goal; the report says met/missed.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
GATEWAY_BIN = os.environ.get("BENCH_GATEWAY_BIN") or os.path.join(TARGET, "release",
                                                                  "hubspot-files-gateway")
BARE_BIN = os.path.join(TARGET, "release", "examples", "bare_hyper")
CLIENT_BIN = os.path.join(TARGET, "release", "examples", "bench_client")

ROUTE = "/files/v3/files/import-from-url/async/tasks/{}/status"
TOKEN = "bench-static-token"  # the simulator's private-app token; nginx and the gateway inject it
KEY = "bench-key"  # the gateway API key the load generators send

PORTS = dict(
    sim=18081, gateway=18080, admin=19090, bare=18082,
    tuned=18083, tuned_h2=18086, stock=18084, nocache=18085, micro=18087,
    gw_micro=18088, gw_micro_admin=19088, gw_mem=18089, gw_mem_admin=19089,
    gateway_b=18090, gateway_b_admin=19091,
)
# A second gateway build to compare with (before/after a proposed fix): its cache-hit rows
# appear beside the gateway's, measured in the same run, alternated like every server.
GATEWAY_B_BIN = os.environ.get("BENCH_GATEWAY_B_BIN")

WORKLOADS = ["cache_hit", "http2", "miss", "coalescing", "storm", "memory"]


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# machine state: load and other compilers, recorded with every workload


def machine_state():
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    busy = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("rustc", "cargo", "cc", "ld", "cc1", "cc1plus", "clippy-driver", "rust-lld"):
            busy.append(comm)
    return {"loadavg": load, "compilers": len(busy), "compiler_names": sorted(set(busy))}


class Sampler:
    """Samples the machine every second while a workload runs: load average, and whether any
    compiler (someone else's cargo/rustc) was running at any moment of it."""

    def __init__(self):
        import threading
        self.samples = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_event.wait(1.0):
            self.samples.append(machine_state())

    def summary(self):
        self.stop_event.set()
        self.thread.join()
        busy = [s for s in self.samples if s["compilers"]]
        names = sorted({n for s in busy for n in s["compiler_names"]})
        loads = [float(s["loadavg"].split()[0]) for s in self.samples] or [0.0]
        return {"samples": len(self.samples), "busy_samples": len(busy), "busy_names": names,
                "load1_max": max(loads), "load1_min": min(loads)}


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    def __init__(self, work):
        self.work = work
        self.procs = {}

    def start(self, name, argv, env=None, cpus=None):
        out = open(os.path.join(self.work, f"{name}.log"), "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)

    def pid(self, name):
        return self.procs[name].pid

    def check_alive(self):
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        return dead


def wait_http(url, headers=None, timeout=30, want=200):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == want:
                    return r.read()
                last = r.status
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready: {last}")


def http(method, url, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json"} if data else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def sim_stats():
    return json.loads(http("GET", f"http://127.0.0.1:{PORTS['sim']}/__sim/stats")[2])


def sim_status_requests():
    return sim_stats()["status_requests"]


def sim_latency(ms):
    http("POST", f"http://127.0.0.1:{PORTS['sim']}/__sim/faults", {"latency_ms": ms})


def metrics(admin_port):
    text = http("GET", f"http://127.0.0.1:{admin_port}/metrics")[2].decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("hubspot_gateway_cache_entries ") or line.startswith(
                "hubspot_gateway_cache_weight_bytes "):
            k, v = line.split()
            out[k] = float(v)
    return out


def children_of(pid):
    kids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def rss_kib(pids, field="VmRSS"):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def set_affinity(pids, cpus):
    """All threads of each pid (taskset -a)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


# --------------------------------------------------------------------------------------------
# wrk / h2load / bench_client


UNITS = {"us": 1, "ms": 1000, "s": 1_000_000}


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)$", s)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def wrk(url, conns, seconds, threads, headers, cpus=None, script=None, script_args=()):
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", script]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    res = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_us"] = parse_latency(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    return res


def h2load(url, conns, streams, seconds, headers):
    argv = ["h2load", f"-c{conns}", f"-m{streams}", "-t1", f"-D{seconds}", "--warm-up-time=1"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    res = {"raw": out}
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    res["non2xx"] = sum(int(x) for x in m.groups()[1:]) if m else None
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    res["mean_us"] = parse_latency(m.group(3)) if m else None
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed",
                  out)
    res["failed"] = int(m.group(5)) if m else None
    return res


def client(*args):
    out = subprocess.run([CLIENT_BIN, *map(str, args)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# configs


def gateway_config(work, name, port, admin, max_bytes="64MiB", pending_ttl="0s"):
    key_hash = hashlib.sha256(KEY.encode()).hexdigest()
    text = f"""# generated by bench/bench.py
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
shutdown_grace = "1s"

[upstream]
base_url = "http://127.0.0.1:{PORTS['sim']}"
connect_timeout = "1s"
request_timeout = "10s"
# High enough never to throttle a benchmark; the simulator runs with --rate-limit 0.
rate_limit = {{ requests = 1000000, per = "10s" }}

[token]
mode = "static"
required_scopes = ["files", "files.ui_hidden.read"]
static_token_env = "BENCH_STATIC_TOKEN"

[cache]
max_bytes = "{max_bytes}"
terminal_ttl = "24h"
pending_ttl = "{pending_ttl}"

[auth]
mode = "api_keys"

[[auth.clients]]
name = "bench"
key_sha256 = "{key_hash}"
"""
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_gateway(procs, work, name, port, admin, binary=None, **kw):
    cfg = gateway_config(work, name, port, admin, **kw)
    procs.start(name, [binary or GATEWAY_BIN, "serve", "--config", cfg],
                env={"RUST_LOG": "warn", "BENCH_STATIC_TOKEN": TOKEN})
    wait_http(f"http://127.0.0.1:{admin}/readyz")


def nginx_conf(work):
    with open(os.path.join(ROOT, "bench", "nginx.conf.in")) as f:
        text = f.read()
    shm = os.path.join("/dev/shm", f"hfg-bench-{os.getpid()}")
    os.makedirs(shm, exist_ok=True)
    os.makedirs(os.path.join(work, "nginx-tmp"), exist_ok=True)
    subs = {"@WORK@": work, "@SHM@": shm, "@TOKEN@": TOKEN, "@SIM_PORT@": PORTS["sim"],
            "@TUNED_PORT@": PORTS["tuned"], "@TUNED_H2_PORT@": PORTS["tuned_h2"],
            "@STOCK_PORT@": PORTS["stock"], "@NOCACHE_PORT@": PORTS["nocache"],
            "@MICRO_PORT@": PORTS["micro"]}
    for k, v in subs.items():
        text = text.replace(k, str(v))
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path, shm


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.work = os.path.join(TARGET, "bench", "work")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.results_dir = args.results_dir
        os.makedirs(self.results_dir, exist_ok=True)
        self.procs = Procs(self.work)
        self.nginx_pid = None
        self.shm = None
        self.problems = []

    # ---- lifecycle

    def start(self):
        p = self.procs
        p.start("simulator", [GATEWAY_BIN, "simulate", "--listen", f"127.0.0.1:{PORTS['sim']}",
                              "--rate-limit", "0", "--latency", "0s", "--static-token", TOKEN],
                env={"RUST_LOG": "warn"})
        wait_http(f"http://127.0.0.1:{PORTS['sim']}/__sim/stats")
        start_gateway(p, self.work, "gateway", PORTS["gateway"], PORTS["admin"])
        if GATEWAY_B_BIN:
            start_gateway(p, self.work, "gateway_b", PORTS["gateway_b"], PORTS["gateway_b_admin"],
                          binary=GATEWAY_B_BIN)
        # The bytes every server answers: the gateway's own answer for the bench task.
        body = wait_http(self.url("gateway", "complete-bench"), self.auth_headers())
        self.body_len = len(body)
        body_file = os.path.join(self.work, "body.json")
        with open(body_file, "wb") as f:
            f.write(body)
        p.start("bare_hyper", [BARE_BIN, f"127.0.0.1:{PORTS['bare']}", body_file])
        wait_http(f"http://127.0.0.1:{PORTS['bare']}/")
        conf, self.shm = nginx_conf(self.work)
        subprocess.run(["nginx", "-c", conf, "-p", self.work, "-t"], check=True,
                       capture_output=True)
        subprocess.run(["nginx", "-c", conf, "-p", self.work], check=True)
        with open(os.path.join(self.work, "nginx.pid")) as f:
            self.nginx_pid = int(f.read())
        for port in ("tuned", "stock", "nocache", "micro"):
            wait_http(self.url(port, "complete-bench"))
        same = {name: wait_http(self.url(name, "complete-bench"), self.auth_headers(name))
                for name in ("bare", "tuned", "stock", "nocache", "direct")}
        for name, b in same.items():
            if b != body:
                self.problems.append(f"{name} answers {len(b)} bytes, not the gateway's "
                                     f"{len(body)} identical bytes")

    def stop(self):
        if self.nginx_pid:
            try:
                os.kill(self.nginx_pid, signal.SIGQUIT)
                for _ in range(50):
                    os.kill(self.nginx_pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
        self.procs.stop_all()
        if self.shm:
            shutil.rmtree(self.shm, ignore_errors=True)

    # ---- helpers

    def url(self, server, task):
        port = {"direct": PORTS["sim"]}.get(server) or PORTS[server]
        return f"http://127.0.0.1:{port}" + ROUTE.format(task)

    def auth_headers(self, server="gateway"):
        if server in ("gateway", "gw_micro", "gw_mem", "gateway_b"):
            return {"Authorization": f"Bearer {KEY}"}
        if server == "direct":
            return {"Authorization": f"Bearer {TOKEN}"}
        return {}

    def wrk_headers(self, server):
        return [f"{k}: {v}" for k, v in self.auth_headers(server).items()]

    def server_pids(self, server):
        if server in ("tuned", "stock", "nocache", "micro", "tuned_h2"):
            return [self.nginx_pid, *children_of(self.nginx_pid)]
        if server == "direct":
            return [self.procs.pid("simulator")]
        if server == "bare":
            return [self.procs.pid("bare_hyper")]
        return [self.procs.pid(server)]

    def all_server_pids(self):
        pids = [self.nginx_pid, *children_of(self.nginx_pid)]
        pids += [p.pid for p in self.procs.procs.values()]
        return pids

    def save(self, name, data):
        data["machine_after"] = machine_state()
        if getattr(self, "sampler", None):
            data["during"] = self.sampler.summary()
            self.sampler = None
        data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        data["smoke"] = self.smoke
        with open(os.path.join(self.results_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        dead = self.procs.check_alive()
        if dead:
            raise RuntimeError(f"processes died during {name}: {dead}")

    # ---- workloads

    SERVERS_H1 = [
        ("gateway", "gateway (cache hit, API key checked)"),
        ("bare", "bare hyper 1.x, bytes from memory"),
        ("tuned", "nginx proxy_cache hit, tuned"),
        ("stock", "nginx proxy_cache hit, stock"),
        ("nocache", "nginx proxy_pass, no cache"),
        ("direct", "the upstream (simulator) directly"),
    ]

    def cache_hit(self):
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        conns_list = [16] if self.smoke else [16, 64]
        modes = ["pinned"] if self.smoke else ["pinned", "unpinned"]
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": []}
        servers = list(self.SERVERS_H1)
        if GATEWAY_B_BIN:
            servers.insert(1, ("gateway_b", "gateway, patched build (BENCH_GATEWAY_B_BIN)"))
        if self.args.servers:
            servers = [x for x in servers if x[0] in self.args.servers.split(",")]
        data["servers"] = servers
        for name, _ in servers:  # warm every cache
            wait_http(self.url(name, "complete-bench"), self.auth_headers(name))
        for mode in modes:
            if mode == "pinned":
                set_affinity(self.all_server_pids(), "0")
            else:
                set_affinity(self.all_server_pids(), "0-1")
            for conns in conns_list:
                for rep in range(reps):
                    # alternate the order each repetition so drift hits all servers alike
                    order = servers if rep % 2 == 0 else list(reversed(servers))
                    for name, _ in order:
                        busy_before = machine_state()["compilers"]
                        r = wrk(self.url(name, "complete-bench"), conns, secs,
                                1 if mode == "pinned" else 2, self.wrk_headers(name),
                                cpus="1" if mode == "pinned" else None)
                        r.pop("raw")
                        r["contended"] = bool(busy_before or machine_state()["compilers"])
                        r.update(server=name, conns=conns, mode=mode, rep=rep,
                                 rss_kib=rss_kib(self.server_pids(name)))
                        log(f"cache_hit {mode} c{conns} rep{rep} {name}: {r['rps']:.0f} req/s "
                            f"p50 {r['p50_us']} us p99 {r['p99_us']} us non2xx {r['non2xx']}")
                        if r["non2xx"] or r["socket_errors"]:
                            self.problems.append(f"cache_hit {name} c{conns}: {r['non2xx']} non-2xx, "
                                                 f"socket errors {r['socket_errors']!r}")
                        data["runs"].append(r)
        set_affinity(self.all_server_pids(), "0-1")
        self.save("cache_hit", data)

    def http2(self):
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": [],
                "conns": 16, "streams": 10}
        servers = [("gateway", PORTS["gateway"]), ("bare", PORTS["bare"]),
                   ("tuned_h2", PORTS["tuned_h2"])]
        for rep in range(reps):
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for name, port in order:
                url = f"http://127.0.0.1:{port}" + ROUTE.format("complete-bench")
                hdrs = self.wrk_headers("gateway" if name == "gateway" else name)
                r = h2load(url, 16, 10, secs, hdrs)
                r.pop("raw")
                r.update(server=name, rep=rep)
                log(f"http2 rep{rep} {name}: {r['rps']:.0f} req/s mean {r['mean_us']} us "
                    f"non2xx {r['non2xx']} failed {r['failed']}")
                if r["non2xx"] or r["failed"]:
                    self.problems.append(f"http2 {name}: non-2xx {r['non2xx']}, failed {r['failed']}")
                data["runs"].append(r)
        self.save("http2", data)

    def miss(self):
        secs = 1 if self.smoke else self.args.seconds
        reps = 1 if self.smoke else self.args.reps
        sim_latency(0)
        data = {"machine_before": machine_state(), "seconds": secs, "reps": reps, "runs": []}
        for conns in ([1] if self.smoke else [1, 16]):
            for rep in range(reps):
                order = ["gateway", "direct"] if rep % 2 == 0 else ["direct", "gateway"]
                for name in order:
                    before = sim_status_requests()
                    r = wrk(self.url(name, "pending-miss"), conns, secs, 1,
                            self.wrk_headers(name))
                    r.pop("raw")
                    r["upstream_calls"] = sim_status_requests() - before
                    r.update(server=name, rep=rep, conns=conns)
                    log(f"miss c{conns} rep{rep} {name}: {r['rps']:.0f} req/s p50 {r['p50_us']} "
                        f"p99 {r['p99_us']} upstream {r['upstream_calls']} non2xx {r['non2xx']}")
                    if r["non2xx"] or r["socket_errors"]:
                        self.problems.append(f"miss {name}: {r['non2xx']} non-2xx, socket errors "
                                             f"{r['socket_errors']!r}")
                    data["runs"].append(r)
        self.save("miss", data)

    def coalescing(self):
        waves = 1 if self.smoke else self.args.waves
        sizes = [200] if self.smoke else [200, 2000]
        latency = 200
        sim_latency(latency)
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
                        before = sim_status_requests()
                        hdr = self.wrk_headers(server)
                        r = client("wave", f"127.0.0.1:{PORTS[server]}", ROUTE.format(task), n,
                                   *hdr)
                        time.sleep(0.3)  # let a late upstream call land in the count
                        r["upstream_calls"] = sim_status_requests() - before
                        r.update(server=server, kind=kind, n=n, wave=wave)
                        log(f"coalescing n{n} wave{wave} {server}/{kind}: upstream "
                            f"{r['upstream_calls']} p50 {r['p50_us']} p99 {r['p99_us']} max "
                            f"{r['max_us']} statuses {r['statuses']} errors {r['errors']}")
                        if r["errors"] or set(r["statuses"]) != {"200"}:
                            self.problems.append(f"coalescing {server}/{kind} n{n}: statuses "
                                                 f"{r['statuses']}, errors {r['errors']}")
                        data["runs"].append(r)
        finally:
            sim_latency(0)
        self.save("coalescing", data)

    def storm(self):
        secs = 3 if self.smoke else self.args.storm_seconds
        clients, tasks, latency = 1000, 100, 200
        start_gateway(self.procs, self.work, "gw_micro", PORTS["gw_micro"],
                      PORTS["gw_micro_admin"], pending_ttl="1s")
        sim_latency(latency)
        data = {"machine_before": machine_state(), "seconds": secs, "clients": clients,
                "tasks": tasks, "latency_ms": latency, "runs": []}
        cases = [("gateway", "gateway, pending_ttl = 0s (default)"),
                 ("gw_micro", "gateway, pending_ttl = 1s"),
                 ("micro", "nginx, 1 s micro-cache + proxy_cache_lock")]
        try:
            for server, label in cases:
                tag = uuid.uuid4().hex[:8]
                before = sim_status_requests()
                t0 = time.time()
                r = client("storm", f"127.0.0.1:{PORTS[server]}",
                           ROUTE.format(f"pending-storm-{tag}-{{}}"), clients, tasks, 1000,
                           secs * 1000, *self.wrk_headers(server))
                elapsed = time.time() - t0
                r["upstream_calls"] = sim_status_requests() - before
                r["upstream_per_s"] = r["upstream_calls"] / r["seconds"]
                r["share_within_50ms"] = r["within_50ms"] / max(1, r["answered"])
                r.update(server=server, label=label, wall_s=elapsed)
                log(f"storm {server}: {r['answered']} answers, upstream {r['upstream_per_s']:.1f}/s, "
                    f"within 50 ms {r['share_within_50ms']:.1%}, p50 {r['p50_us']} p99 "
                    f"{r['p99_us']} statuses {r['statuses']} errors {r['errors']}")
                if r["errors"] or set(r["statuses"]) != {"200"}:
                    self.problems.append(f"storm {server}: statuses {r['statuses']}, errors "
                                         f"{r['errors']}")
                data["runs"].append(r)
        finally:
            sim_latency(0)
            self.procs.stop("gw_micro")
        self.save("storm", data)

    def memory(self):
        sizes = ["8MiB"] if self.smoke else self.args.memory_sizes
        sim_latency(0)
        data = {"machine_before": machine_state(), "runs": []}
        script = os.path.join(ROOT, "bench", "fill.lua")
        parse = {"MiB": 1 << 20, "GiB": 1 << 30}
        for size in sizes:
            max_bytes = int(re.match(r"\d+", size).group(0)) * parse[size[-3:]]
            start_gateway(self.procs, self.work, "gw_mem", PORTS["gw_mem"],
                          PORTS["gw_mem_admin"], max_bytes=size)
            pid = self.procs.pid("gw_mem")
            admin = PORTS["gw_mem_admin"]
            idle_rss = rss_kib([pid])
            t0 = time.time()
            requests = 0
            history = []
            chunk = 2 if self.smoke else 10
            for i in range(400):
                r = wrk(f"http://127.0.0.1:{PORTS['gw_mem']}/", 32, chunk, 2,
                        self.wrk_headers("gateway"), script=script,
                        script_args=[f"{size}-{i}"])
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
            self.procs.stop("gw_mem")
        self.save("memory", data)


# --------------------------------------------------------------------------------------------
# the report


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
    return (f"_Run {d['finished']}{' (smoke)' if d.get('smoke') else ''}; load average before "
            f"{b['loadavg']}, after {a['loadavg']}{flag}._")


def report(results_dir, out_md, chart_png, notes_file):
    def load(name):
        p = os.path.join(results_dir, f"{name}.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    labels = dict(Bench.SERVERS_H1)
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
    add("Generated by `bench/run` (see bench/bench.py) from the results of its last full run "
        "of each workload; the prose after the tables is `bench/notes.md`. "
        f"Machine: {os.cpu_count()} cores ({cpu}), Linux {os.uname().release}, "
        f"wrk and h2load on loopback. Ratios and goals compare figures from the same run.")
    add("")
    goals = []

    d = load("cache_hit")
    if d:
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
        add("The last column counts the runs of that row that began or ended while another "
            "compiler was running (not clean).")
        add("")
        add("| server | mode | conns | req/s | p50 | p99 | RSS | vs bare hyper | contended runs |")
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        agg = {}
        for r in d["runs"]:
            agg.setdefault((r["mode"], r["conns"], r["server"]), []).append(r)
        combos = sorted({(m, c) for m, c, _ in agg}, key=lambda x: (x[0] != "pinned", x[1]))
        chart, chart_busy = {}, set()
        for mode, conns in combos:
            bare = med(x["rps"] for x in agg.get((mode, conns, "bare"), []))
            for server, label in d.get("servers", Bench.SERVERS_H1):
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
                    f"{fmt_us(med(x['p99_us'] for x in rs))} | "
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

    d = load("http2")
    if d:
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

    d = load("miss")
    if d:
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

    d = load("coalescing")
    if d:
        add(f"## 3. Coalescing: N callers of one new task at once, upstream latency {d['latency_ms']} ms")
        add("")
        add(load_line(d))
        add("")
        add("`bench_client wave`: N connections opened first, then one GET each released "
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

    d = load("storm")
    if d:
        add(f"## 4. Polling storm: {d['clients']:,} clients polling {d['tasks']} in-flight tasks "
            f"every second for {d['seconds']} s, upstream latency {d['latency_ms']} ms")
        add("")
        add(load_line(d))
        add("")
        add("`bench_client storm`: each client on its own keep-alive connection polls task "
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

    d = load("memory")
    if d:
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
    import textwrap
    ax.set_xticklabels(["\n".join(textwrap.wrap(s, 22)) for s in servers], fontsize=8)
    ax.set_ylabel("thousand requests / s (median)")
    ax.set_title("Cache hit, ~1.1 KB terminal status body, HTTP/1.1 keep-alive, wrk, 2 cores")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds per workload, results under target/bench/smoke")
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite docs/benchmarks.md from stored results, run nothing")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--servers", help="cache_hit only: a subset of gateway,gateway_b,bare,tuned,"
                    "stock,nocache,direct")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--storm-seconds", type=int, default=30)
    ap.add_argument("--memory-sizes", type=lambda s: s.split(","), default=["64MiB", "1GiB"])
    ap.add_argument("--memory-limit-s", type=int, default=900)
    ap.add_argument("--results-dir", help="where workload results are stored (default "
                    "target/bench/results, or target/bench/smoke); another directory keeps an "
                    "experiment (e.g. BENCH_GATEWAY_BIN=a patched build) apart from the report")
    args = ap.parse_args()
    results = args.results_dir or os.path.join(TARGET, "bench",
                                               "smoke" if args.smoke else "results")
    args.results_dir = results
    if args.smoke:
        out_md, chart = os.path.join(TARGET, "bench", "benchmarks-smoke.md"), None
    else:
        out_md = os.path.join(ROOT, "docs", "benchmarks.md")
        chart = os.path.join(ROOT, "docs", "benchmarks-cache-hit.png")
    notes = os.path.join(ROOT, "bench", "notes.md")
    if args.results_dir != os.path.join(TARGET, "bench", "results") and not args.smoke:
        out_md, chart = os.path.join(results, "benchmarks.md"), None
    if args.report_only:
        report(results, out_md, chart, notes)
        return 0
    st = machine_state()
    log(f"load average {st['loadavg']}, other compiler processes: {st['compilers']}")
    if st["compilers"] and not args.smoke:
        log("WARNING: other compilers are running; the figures will be marked contended")
    bench = Bench(args)
    only = [w for w in args.only.split(",") if w]
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    try:
        bench.start()
        for w in WORKLOADS:
            if w in only:
                log(f"== {w}")
                bench.sampler = Sampler()
                getattr(bench, w)()
    finally:
        bench.stop()
    report(results, out_md, chart, notes)
    if bench.problems:
        log("PROBLEMS SEEN:")
        for p in bench.problems:
            log("  " + p)
        return 1
    log("no errors, no non-2xx answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
