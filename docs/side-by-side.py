#!/usr/bin/env python3
"""Runs two benchmark commands at the same time, round after round, and compares them.

    docs/side-by-side.py --rounds 5 \\
        --a "target/release/vignetim-bench" \\
        --b "VIGNETIM_WORKER_THREADS=1 /tmp/other/vignetim-bench" \\
        -- --quick --scenarios e2e --e2e-events 3000 --latency-rate 100

Each side is a command line whose leading NAME=VALUE words are set in its environment
(the benchmark passes its environment on to the service it starts). The arguments after
`--` go to both. Each round starts both at once under `docs/thread-cpu.py`, which reads
each thread of the service they start, and the next round starts them in the other order.

Why at the same time: on this shared host the same build reads 15 % more or less CPU per
delivery from one run to the next, and twice as much between windows of the day, so two
builds run one after the other differ by the host's drift as much as by their code. Run
side by side, both services share the same two cores in the same seconds, so the drift
falls on both alike: with the same build on both sides, the ratio B/A of the service's
CPU ticks stayed within 2-5 % of 1 in each round and within 1 % over six, where runs one
after the other moved by 15 % (BENCHMARKS.md, item 36). Each service gets
about half the machine, so the throughput each reads is about half of a run alone; compare
the two with each other, never with a run alone.

Prints each round's figures for A and B, then the medians of the ratios B/A over the rounds.
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def side(command):
    """(environment, argv) of a side's command line."""
    words = shlex.split(command)
    env = dict(os.environ)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words:
        sys.exit(f"no command in {command!r}")
    return env, words


def figures(output):
    """The e2e figures and the thread ticks `thread-cpu.py` printed."""
    found = {}
    m = re.search(r"^e2e: (\d+) deliveries/s, ceiling (\d+)/s, ratio ([0-9.]+), service ([0-9.]+)", output, re.M)
    if not m:
        sys.exit("a side failed:\n" + output[-3000:])
    found["deliveries/s"], found["ceiling/s"], found["ratio"], found["CPU-s/1000"] = map(float, m.groups())
    for name in ("tokio-rt-worker", "sqlite-writer", "all"):
        t = re.search(rf"^{name}\s+(\d+)", output, re.M)
        found[f"{name} ticks"] = float(t.group(1)) if t else 0.0
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--a", required=True, help="the first side's command line")
    parser.add_argument("--b", required=True, help="the second side's command line")
    parser.add_argument("bench_args", nargs="*", help="arguments for both, after --")
    args = parser.parse_args()
    sides = {"A": side(args.a), "B": side(args.b)}
    ratios = {}
    for round_ in range(args.rounds):
        order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
        running = {}
        for name in order:
            env, argv = sides[name]
            running[name] = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "thread-cpu.py"), *argv, *args.bench_args],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        results = {name: figures(p.communicate()[0]) for name, p in running.items()}
        for name in ("A", "B"):
            print(f"round {round_ + 1} {name}: " + "  ".join(f"{k} {v:g}" for k, v in results[name].items()))
        for key, a in results["A"].items():
            if a:
                ratios.setdefault(key, []).append(results["B"][key] / a)
    print(f"medians of B/A over {args.rounds} rounds (min-max):")
    for key, values in ratios.items():
        print(f"  {key:<22}{statistics.median(values):.3f}  ({min(values):.3f}-{max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
