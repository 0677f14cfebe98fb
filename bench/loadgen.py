"""bench/run's load: wrk, h2load and bench-client runs parsed into dicts, and idle
connections held open beside (or instead of) the load.
"""

import json
import re
import socket
import subprocess
import time

from harness import CLIENT_BIN

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
    """One bench-client run (`wave` or `storm`); its last stdout line is the JSON result."""
    out = subprocess.run([CLIENT_BIN, *map(str, args)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_answer(sock):
    """Reads one HTTP/1.1 answer with a Content-Length body; returns its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer's head")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the answer's body")
        body += chunk
    return int(head[9:12])


class IdleConns:
    """N TCP connections to one server, held open and doing nothing.

    `silent`: connected, never a byte sent (a client that has not spoken yet).
    `keepalive`: one GET of `path` answered, then idle on HTTP/1.1 keep-alive (a client
    between polls)."""

    KINDS = ("silent", "keepalive")

    def __init__(self, addr, kind, path=None, headers=()):
        assert kind in self.KINDS, kind
        host, port = addr.rsplit(":", 1)
        self.target = (host, int(port))
        self.kind = kind
        extra = "".join(f"{h}\r\n" for h in headers)
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
        self.socks = []
        self.statuses = {}
        self.errors = 0

    def open(self, n):
        """Opens up to n connections; returns the seconds it took. Failures are counted."""
        t0 = time.time()
        for _ in range(n):
            try:
                s = socket.create_connection(self.target, timeout=10)
                if self.kind == "keepalive":
                    s.sendall(self.request)
                    status = str(read_answer(s))
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                # Blocking from here on: Python waits out a socket's timeout before a recv,
                # even a MSG_DONTWAIT one, which still_open relies on returning at once.
                s.settimeout(None)
                self.socks.append(s)
            except OSError:
                self.errors += 1
        return time.time() - t0

    def still_open(self):
        """How many of the held connections are still open and idle: nothing to read. End of
        stream, a reset, or bytes the server sent unasked (a timeout answer before closing)
        count as closed."""
        alive = 0
        for s in self.socks:
            try:
                s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []
