"""bench/run's harness: the binaries, the processes it starts, the ports they bound, the
machine's state while a workload runs, and what /proc says about a server (RSS, open files).

Every server binds port 0. The harness learns the port from the process itself:
- the gateway logs `gateway listening addr=...` and `admin listening addr=...` with the
  addresses it bound (what tests/process.rs reads), at `info` for its server module only;
- the simulator's log names the address it was asked for, not the one it bound, so its
  listening socket is found in /proc (the socket inodes among its open files, looked up in
  /proc/PID/net/tcp);
- bare-hyper prints `bare-hyper listening on ADDR` with the address it bound.
nginx cannot bind port 0 (it rejects the port, and several server blocks on one wildcard port
would share one socket), so its ports are picked by binding port 0 and closing the socket
immediately before nginx starts; when another process takes one in between, nginx fails to
bind and the harness retries with fresh ports.
"""

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
GATEWAY_BIN = os.environ.get("BENCH_GATEWAY_BIN") or os.path.join(TARGET, "release",
                                                                  "hubspot-files-gateway")
# A second gateway build to compare with (before/after a proposed fix): its cache-hit rows
# appear beside the gateway's, measured in the same run, alternated like every server.
GATEWAY_B_BIN = os.environ.get("BENCH_GATEWAY_B_BIN")
BARE_BIN = os.path.join(TARGET, "release", "bare-hyper")
CLIENT_BIN = os.path.join(TARGET, "release", "bench-client")

ROUTE = "/files/v3/files/import-from-url/async/tasks/{}/status"
TOKEN = "bench-static-token"  # the simulator's private-app token; nginx and the gateway inject it
KEY = "bench-key"  # the gateway API key the load generators send

# Only the server module at info (it logs the bound addresses); the access lines follow
# `[log] access` in each gateway's config, whatever RUST_LOG says.
GATEWAY_LOG = "warn,hubspot_files_gateway::server=info"

NGINX_SERVERS = ("tuned", "tuned_h2", "stock", "nocache", "micro")
# gw_r0..2: cluster-mode replicas sharing one redis-server; gw_single: the same without it.
REPLICAS = ("gw_r0", "gw_r1", "gw_r2")
GATEWAYS = ("gateway", "gateway_nolog", "gateway_b", "gw_micro", "gw_mem", "gw_idle",
            *REPLICAS, "gw_single")

SERVERS_H1 = [
    ("gateway", "gateway (cache hit, API key checked, JSON access log to a file)"),
    ("gateway_nolog", "gateway, access log off"),
    ("bare", "bare hyper 1.x, bytes from memory"),
    ("tuned", "nginx proxy_cache hit, tuned"),
    ("stock", "nginx proxy_cache hit, stock"),
    ("nocache", "nginx proxy_pass, no cache"),
    ("direct", "the upstream (simulator) directly"),
]


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def raise_file_limit():
    """The soft file limit raised to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --------------------------------------------------------------------------------------------
# machine state: load and other compilers, recorded with every workload


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def machine_state():
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    busy = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("rustc", "cargo", "cc", "ld", "cc1", "cc1plus", "clippy-driver", "rust-lld"):
            busy.append(comm)
    return {"loadavg": load, "compilers": len(busy), "compiler_names": sorted(set(busy)),
            "steal": steal_ticks()}


def steal_ticks():
    """Clock ticks the hypervisor gave to other machines while this one had work (`steal` in
    /proc/stat, all CPUs): time neither the servers nor anything else here could run."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


class Sampler:
    """Samples the machine every second while a workload runs: load average, and whether any
    compiler (someone else's cargo/rustc) was running at any moment of it."""

    def __init__(self):
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
        # Share of all CPU time the hypervisor took away between the first and last sample.
        span = (len(self.samples) - 1) * (os.cpu_count() or 1) * os.sysconf("SC_CLK_TCK")
        steal = (self.samples[-1]["steal"] - self.samples[0]["steal"]) / span if span > 0 else 0.0
        return {"samples": len(self.samples), "busy_samples": len(busy), "busy_names": names,
                "load1_max": max(loads), "load1_min": min(loads), "steal": steal}


# --------------------------------------------------------------------------------------------
# /proc


def children_of(pid):
    kids = []
    for p in all_pids():
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(p)
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


def cpu_seconds(pids):
    """CPU time (user + system, every thread) the processes have used so far. Per request it
    is what a server costs, and unlike req/s it barely moves when other processes take CPU
    from the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def open_files(pid):
    """How many file descriptors the process holds (a server's accepted connections show
    here as soon as it has accepted them)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def listening_ports(pid):
    """The TCP ports the process is listening on, from its socket inodes and /proc/net/tcp."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", target)
        if m:
            inodes.add(m.group(1))
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; column 9 is the inode
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def set_affinity(pids, cpus):
    """All threads of each pid (taskset -a)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def free_port():
    """A port nothing listens on right now: bound to port 0, read, closed. Only for nginx,
    which cannot bind port 0 itself; see the module doc for the race and how it is handled."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    def __init__(self, work):
        self.work = work
        self.procs = {}

    def log_path(self, name):
        return os.path.join(self.work, f"{name}.log")

    def start(self, name, argv, env=None):
        # A fresh file in append mode: a log truncated between runs (truncate_log) is written
        # from its start again, not past a hole.
        if os.path.exists(self.log_path(name)):
            os.remove(self.log_path(name))
        out = open(self.log_path(name), "a")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                             start_new_session=True)
        out.close()
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
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def wait_for(self, name, found, what, timeout=30):
        """Polls `found()` until it returns something, failing early if the process exits."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = found()
            if value:
                return value
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.05)
        with open(self.log_path(name)) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{name}: no {what} (exit {self.procs[name].poll()}); log:\n{tail}")

    def truncate_log(self, name):
        """The size of the process's log, which is then emptied (an access-logged benchmark
        writes hundreds of MB, and the disk is shared)."""
        path = self.log_path(name)
        size = os.path.getsize(path)
        os.truncate(path, 0)
        return size

    def logged_addr(self, name, pattern):
        """The first address `pattern` (a regex with one group) matches in the process's log."""
        def found():
            with open(self.log_path(name)) as f:
                m = re.search(pattern, f.read())
            return m.group(1) if m else None
        return self.wait_for(name, found, f"line matching {pattern!r}")

    def listening_addr(self, name):
        """The one port a single-listener process bound, from /proc."""
        def found():
            ports = listening_ports(self.pid(name))
            return f"127.0.0.1:{ports[0]}" if ports else None
        return self.wait_for(name, found, "listening socket in /proc")


# --------------------------------------------------------------------------------------------
# HTTP helpers


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


def metrics(admin_addr):
    text = http("GET", f"http://{admin_addr}/metrics")[2].decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("hubspot_gateway_cache_entries ", "hubspot_gateway_cache_weight_bytes ",
                            "hubspot_gateway_log_lines_dropped_total ",
                            "hubspot_gateway_cluster_backend_up ",
                            "hubspot_gateway_cluster_local_fallbacks_total{",
                            "hubspot_gateway_cluster_redis_calls_total{")):
            k, v = line.split()
            out[k] = float(v)
    return out


# --------------------------------------------------------------------------------------------
# configs


def gateway_config(path, sim_addr, max_bytes="64MiB", pending_ttl="0s", server_extra=None,
                   access_log="off", cluster=None):
    """`access_log`: `[log] access` with JSON lines, as a deployment writes them (the process's
    stderr goes to a file); None leaves `[log]` out, for a build that predates it. `cluster`:
    the `[cluster]` table's keys and values (absent: no cluster mode)."""
    key_hash = hashlib.sha256(KEY.encode()).hexdigest()
    log_section = f'[log]\nformat = "json"\naccess = "{access_log}"\n' if access_log else ""
    if cluster:
        log_section += "[cluster]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                               for k, v in cluster.items())
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (server_extra or {}).items())
    text = f"""# generated by bench/harness.py
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"
{extra}
[upstream]
base_url = "http://{sim_addr}"
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

{log_section}"""
    with open(path, "w") as f:
        f.write(text)
    return path


def check_config(binary, path):
    """(accepted, the gateway's message) for a config file, by the gateway's own check."""
    r = subprocess.run([binary, "check-config", "--config", path], capture_output=True,
                       text=True, env={**os.environ, "BENCH_STATIC_TOKEN": TOKEN}, check=False)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def nginx_conf(work, ports, sim_addr, shm):
    with open(os.path.join(ROOT, "bench", "nginx.conf.in")) as f:
        text = f.read()
    subs = {"@WORK@": work, "@SHM@": shm, "@TOKEN@": TOKEN, "@SIM_ADDR@": sim_addr}
    subs.update({f"@{name.upper()}_PORT@": port for name, port in ports.items()})
    for k, v in subs.items():
        text = text.replace(k, str(v))
    left = re.findall(r"@[A-Z0-9_]+@", text)
    if left:
        raise RuntimeError(f"nginx.conf.in: no value for {sorted(set(left))}")
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


# --------------------------------------------------------------------------------------------
# the servers under test


class Servers:
    """Starts and stops every server, and knows where each one listens."""

    def __init__(self, work):
        self.work = work
        self.procs = Procs(work)
        self.addr = {}  # server name -> "127.0.0.1:PORT" of its service port
        self.admin = {}  # gateway name -> "127.0.0.1:PORT" of its admin port
        self.nginx_pid = None
        self.shm = None

    def start_simulator(self):
        self.procs.start("simulator", [GATEWAY_BIN, "simulate", "--listen", "127.0.0.1:0",
                                       "--rate-limit", "0", "--latency", "0s",
                                       "--static-token", TOKEN], env={"RUST_LOG": "warn"})
        self.addr["direct"] = self.procs.listening_addr("simulator")
        wait_http(f"http://{self.addr['direct']}/__sim/stats")

    def start_gateway(self, name, binary=None, **config):
        path = os.path.join(self.work, f"{name}.toml")
        cfg = gateway_config(path, self.addr["direct"], **config)
        if binary and not check_config(binary, cfg)[0]:
            log(f"{name}: this build refuses [log]; started without it")
            cfg = gateway_config(path, self.addr["direct"], **{**config, "access_log": None})
        self.procs.start(name, [binary or GATEWAY_BIN, "serve", "--config", cfg],
                         env={"RUST_LOG": GATEWAY_LOG, "BENCH_STATIC_TOKEN": TOKEN})
        # `addr=...` in text lines, `"addr":"..."` in JSON lines.
        self.addr[name] = self.procs.logged_addr(name, r'gateway listening.*?\baddr(?:=|":")([^\s"]+)')
        self.admin[name] = self.procs.logged_addr(name, r'admin listening.*?\baddr(?:=|":")([^\s"]+)')
        wait_http(f"http://{self.admin[name]}/readyz")
        return self.procs.pid(name)

    def stop_gateway(self, name):
        self.procs.stop(name)
        self.addr.pop(name, None)
        self.admin.pop(name, None)

    def start_redis(self, tries=3):
        """A redis-server without persistence. Port 0 means "no TCP" to it, so its port is
        picked like nginx's; it counts as started once it listens there itself (/proc)."""
        for attempt in range(tries):
            port = free_port()
            self.procs.start("redis", ["redis-server", "--port", str(port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no"])
            deadline = time.time() + 10
            while time.time() < deadline and self.procs.procs["redis"].poll() is None:
                if port in listening_ports(self.procs.pid("redis")):
                    self.addr["redis"] = f"127.0.0.1:{port}"
                    return
                time.sleep(0.05)
            self.procs.stop("redis")
            log(f"redis-server did not listen on {port} (attempt {attempt + 1})")
        raise RuntimeError("redis-server did not start")

    def start_bare(self, body_file):
        self.procs.start("bare-hyper", [BARE_BIN, "127.0.0.1:0", body_file])
        self.addr["bare"] = self.procs.logged_addr("bare-hyper",
                                                   r"bare-hyper listening on (\S+),")
        wait_http(f"http://{self.addr['bare']}/")

    def start_nginx(self, tries=3):
        self.shm = os.path.join("/dev/shm", f"hfg-bench-{os.getpid()}")
        os.makedirs(self.shm, exist_ok=True)
        os.makedirs(os.path.join(self.work, "nginx-tmp"), exist_ok=True)
        for attempt in range(tries):
            ports = {name: free_port() for name in NGINX_SERVERS}
            conf = nginx_conf(self.work, ports, self.addr["direct"], self.shm)
            subprocess.run(["nginx", "-c", conf, "-p", self.work, "-t"], check=True,
                           capture_output=True)
            r = subprocess.run(["nginx", "-c", conf, "-p", self.work], capture_output=True,
                               text=True, check=False)
            if r.returncode == 0:
                break
            if "Address already in use" not in r.stderr or attempt == tries - 1:
                raise RuntimeError(f"nginx did not start: {r.stderr.strip()}")
            log(f"nginx: a picked port was taken meanwhile, retrying ({r.stderr.strip()})")
        with open(os.path.join(self.work, "nginx.pid")) as f:
            self.nginx_pid = int(f.read())
        for name, port in ports.items():
            self.addr[name] = f"127.0.0.1:{port}"

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

    # ---- addressing

    def url(self, server, task):
        return f"http://{self.addr[server]}" + ROUTE.format(task)

    def auth_headers(self, server="gateway"):
        if server in GATEWAYS:
            return {"Authorization": f"Bearer {KEY}"}
        if server == "direct":
            return {"Authorization": f"Bearer {TOKEN}"}
        return {}

    def wrk_headers(self, server):
        return [f"{k}: {v}" for k, v in self.auth_headers(server).items()]

    def server_pids(self, server):
        if server in NGINX_SERVERS:
            return [self.nginx_pid, *children_of(self.nginx_pid)]
        if server == "direct":
            return [self.procs.pid("simulator")]
        if server == "bare":
            return [self.procs.pid("bare-hyper")]
        return [self.procs.pid(server)]

    def all_server_pids(self):
        pids = [self.nginx_pid, *children_of(self.nginx_pid)] if self.nginx_pid else []
        return pids + [p.pid for p in self.procs.procs.values()]

    # ---- the simulator's control routes

    def sim_status_requests(self):
        stats = http("GET", f"http://{self.addr['direct']}/__sim/stats")[2]
        return json.loads(stats)["status_requests"]

    def sim_latency(self, ms):
        http("POST", f"http://{self.addr['direct']}/__sim/faults", {"latency_ms": ms})
