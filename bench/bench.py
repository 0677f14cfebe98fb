#!/usr/bin/env python3
"""bench/run's entry point: starts everything on loopback, runs the workloads, stores each
workload's results as JSON, and writes docs/benchmarks.md (+ the chart) from them.

Run it through bench/run, which installs the tools and builds the binaries first. The pieces:
harness.py (processes, ports, /proc, machine sampling), loadgen.py (wrk, h2load,
bench-client, idle connections), workloads.py, report.py. Benchmarks are never timed tests:
nothing here asserts a goal; the report says met/missed.
"""

import argparse
import os
import signal
import sys

from harness import ROOT, TARGET, Sampler, log, machine_state
from report import report
from workloads import WORKLOADS, Bench


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds per workload, small N, results under target/bench/smoke")
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
    ap.add_argument("--idle-conns", type=int, default=10_000,
                    help="idle: connections held at once (each kind)")
    ap.add_argument("--idle-beside", type=int, default=5_000,
                    help="cache_hit_idle: idle connections held beside the load")
    ap.add_argument("--results-dir", help="where workload results are stored (default "
                    "target/bench/results, or target/bench/smoke); another directory keeps an "
                    "experiment (e.g. BENCH_GATEWAY_BIN=a patched build) apart from the report")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    args.only = only
    return args


def main():
    args = parse_args()
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
    # The servers run in their own sessions: a SIGTERM to bench/run must still stop them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench.start()
        for w in WORKLOADS:
            if w in args.only:
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
