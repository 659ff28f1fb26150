#!/usr/bin/env python3
"""Runs one benchmark command and reports, for the service it starts, each thread's CPU.

    docs/thread-cpu.py target/release/vignetim-bench --quick --scenarios e2e --latency-rate 5000

The benchmark runs the service as its child process. While it runs, this samples every
thread of that child (`/proc/<pid>/task/<tid>/stat` and `.../io`) every 50 ms and keeps the
last reading of each, then prints the e2e figures and, per thread name (tokio-rt-worker,
sqlite-writer, sqlite-checkpoint, sqlite-reader), the CPU ticks (1/100 s; user + system,
the system part after the slash), minor page faults, and write system calls with the bytes
they wrote. Alternating two builds with the same work (a fixed `--latency-rate`) compares
them by each thread's CPU, which moves far less than throughput on a noisy machine
(BENCHMARKS.md, "What the profiles showed").
"""

import json
import os
import re
import subprocess
import sys
import threading
import time


def read_thread(pid, tid):
    stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    user, system, minflt = int(fields[11]), int(fields[12]), int(fields[7])
    io = dict(line.split(": ") for line in open(f"/proc/{pid}/task/{tid}/io").read().splitlines())
    return name, user + system, system, minflt, int(io["syscw"]), int(io["wchar"])


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    bench = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                children = open(f"/proc/{bench.pid}/task/{bench.pid}/children").read().split()
            except OSError:
                children = []
            for child in children:
                try:
                    for tid in os.listdir(f"/proc/{child}/task"):
                        last[(child, tid)] = read_thread(child, tid)
                except OSError:
                    pass  # a thread or the child went away between two reads
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = bench.stdout.read()
    bench.wait()
    done.set()
    sampler.join()

    for line in output.splitlines():
        if line.startswith("RESULT") and '"e2e"' in line:
            r = json.loads(line[len("RESULT ") :])
            print(
                "e2e: {deliveries_per_s:.0f} deliveries/s, ceiling {ceiling_per_s:.0f}/s, ratio {ratio:.3f}, "
                "service {cpu_s_per_1000} CPU-s per 1,000, benchmark {load} during the peak, "
                "p99 {p99_ms:.1f} ms".format(load=r.get("load_cpu_s_per_1000"), **r)
            )
    if bench.returncode != 0:
        print(output[-3000:])
        return bench.returncode

    totals = {}
    for name, ticks, system, minflt, calls, written in last.values():
        name = re.sub(r"[-_]?\d+$", "", name)
        t = totals.setdefault(name, [0, 0, 0, 0, 0])
        for i, v in enumerate((ticks, system, minflt, calls, written)):
            t[i] += v
    print(f"{'thread':<20}{'ticks/sys':>12}{'minflt':>10}{'writes':>10}{'MiB':>8}")
    for name, (ticks, system, minflt, calls, written) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:<20}{f'{ticks}/{system}':>12}{minflt:>10}{calls:>10}{written >> 20:>8}")
    print(f"{'all':<20}{sum(t[0] for t in totals.values()):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
