#!/usr/bin/env python3
"""Turn one run of benches/nbd-bench.sh into a markdown report.

    benches/fio_report.py RUN_DIR

RUN_DIR holds what nbd-bench.sh wrote:

  meta.tsv   key<TAB>value lines (machine, versions, parameters), in order
  rows.tsv   row<TAB>label<TAB>kind          kind: iops | iops+lat | bw
  cells.tsv  row<TAB>round<TAB>server<TAB>status<TAB>json<TAB>cpu_s
             one line per fio run; status is "ok" or why it failed
  *.json     raw fio output (--output-format=json), one file per cell

The report is printed on stdout. Only the standard library is used, so it can
be re-run on any saved run directory to re-render a table.

How the figures are combined (see docs/benchmarks.md):
  * each server's figure is the median over rounds of that cell's result;
  * a ratio is the median over rounds of the per-round ratio, both servers
    having run back to back in the same round, so slow drift of the machine
    cancels out; with more than one round the min-max of the per-round ratios
    follows in brackets.
"""

import json
import os
import statistics
import sys

REFERENCE = "nbdkit"  # the server the targets are measured against
SUBJECT = "tandem"
SERVER_ORDER = ["tandem", "nbdkit", "qemu-nbd"]

# Targets from the issue, always tandem / nbdkit measured in the same run.
THROUGHPUT_TARGET = 1.0  # ratio >= 1.0 on every row
LATENCY_TARGET = 1.10  # QD1 p50 latency ratio <= 1.10


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def fio_numbers(path):
    """IOPS, MB/s and completion-latency percentiles (µs) of a one-job fio run."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    job = data["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    # Exactly one direction is used per row; pick the one that did I/O.
    side = max((job["read"], job["write"]), key=lambda s: s["total_ios"])
    if side["total_ios"] == 0:
        raise ValueError("no I/O completed")
    pct = side.get("lat_ns", {}).get("percentile") or side["clat_ns"].get("percentile", {})
    # Exact percentiles from fio's per-I/O log where the bench kept them
    # (benches/lib.sh, exact_latency): fio's own come from buckets 1/64 of
    # a power of two wide.
    exact = path[: -len(".json")] + ".lat.json" if path.endswith(".json") else None
    if exact and os.path.exists(exact):
        with open(exact, encoding="utf-8") as f:
            logged = json.load(f)
        if logged.get("ios") != side["total_ios"]:
            raise ValueError(f"{exact}: {logged.get('ios')} I/Os logged, fio counted {side['total_ios']}")
        pct = logged["percentile_ns"]

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else None

    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p50": p("50.000000"),
        "p99": p("99.000000"),
    }


def fmt(value, metric):
    if value is None:
        return "—"
    if metric in ("p50", "p99"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if metric == "cpu":
        return f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def ratio_text(ratios):
    if not ratios:
        return "—"
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    run_dir = argv[1]
    meta = read_tsv(os.path.join(run_dir, "meta.tsv"))
    meta_d = {kv[0]: kv[1] if len(kv) > 1 else "" for kv in meta}
    rows = read_tsv(os.path.join(run_dir, "rows.tsv"))
    cells = read_tsv(os.path.join(run_dir, "cells.tsv"))

    selected = [s for s in meta_d.get("servers", "").split(",") if s]
    if not selected:  # older run directories: take them from the cells
        selected = list(dict.fromkeys(c[2] for c in cells))
    servers = [s for s in SERVER_ORDER if s in selected] + [
        s for s in selected if s not in SERVER_ORDER
    ]

    # results[row][server][round] = numbers (dict) or an error string
    results = {}
    cpu = {}
    failures = []
    for cell in cells:
        row, rnd, server, status, jpath = cell[:5]
        cpu_s = cell[5] if len(cell) > 5 else ""
        slot = results.setdefault(row, {}).setdefault(server, {})
        if status != "ok":
            slot[rnd] = status
            failures.append(f"{row} / {server} / round {rnd}: {status}")
            continue
        try:
            slot[rnd] = fio_numbers(os.path.join(run_dir, jpath))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            slot[rnd] = f"unreadable fio output ({e})"
            failures.append(f"{row} / {server} / round {rnd}: {slot[rnd]}")
            continue
        if cpu_s:
            cpu.setdefault(row, {}).setdefault(server, []).append(float(cpu_s))

    def values(row, server, metric):
        per_round = results.get(row, {}).get(server, {})
        return {r: v[metric] for r, v in per_round.items() if isinstance(v, dict) and v[metric] is not None}

    def median(row, server, metric):
        vals = list(values(row, server, metric).values())
        return statistics.median(vals) if vals else None

    def ratios(row, a, b, metric):
        va, vb = values(row, a, metric), values(row, b, metric)
        return [va[r] / vb[r] for r in sorted(va) if r in vb and vb[r] > 0]

    out = []
    w = out.append
    w(f"# NBD benchmark: {meta_d.get('date', '?')}")
    w("")
    for kv in meta:
        if kv[0] in ("date",):
            continue
        w(f"- **{kv[0]}**: {kv[1] if len(kv) > 1 else ''}")
    w("")

    # Ratios are subject/other. Without tandem in the run (developing the
    # harness), the first other server is compared with nbdkit instead, with
    # no targets.
    subject = SUBJECT if SUBJECT in servers else next((s for s in servers if s != REFERENCE), None)
    targets = subject == SUBJECT and REFERENCE in servers
    others = [s for s in servers if s != subject]
    head = ["Row", "Metric"] + servers
    if subject and others:
        head += [f"{subject}/{o}" for o in others]
        if targets:
            head += [f"target vs {REFERENCE}", "met"]
    w("| " + " | ".join(head) + " |")
    w("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")

    missed = []
    for row, label, kind in rows:
        metrics = []
        if kind.startswith("iops"):
            metrics.append(("iops", "IOPS", "higher"))
        if kind == "bw":
            metrics.append(("mbps", "MB/s", "higher"))
        if kind.endswith("+lat"):
            metrics.append(("p50", "p50 latency µs", "lower"))
            metrics.append(("p99", "p99 latency µs", "lower"))
        for metric, mlabel, better in metrics:
            line = [label, mlabel] + [fmt(median(row, s, metric), metric) for s in servers]
            if subject and others:
                for o in others:
                    line.append(ratio_text(ratios(row, subject, o, metric)))
                if targets:
                    rs = ratios(row, SUBJECT, REFERENCE, metric)
                    med = statistics.median(rs) if rs else None
                    if metric in ("iops", "mbps"):
                        target = f"≥ {THROUGHPUT_TARGET:.2f}"
                        ok = med is not None and med >= THROUGHPUT_TARGET
                    elif metric == "p50":
                        target = f"≤ {LATENCY_TARGET:.2f}"
                        ok = med is not None and med <= LATENCY_TARGET
                    else:
                        target, ok = "", None
                    line += [target, "" if ok is None else ("yes" if ok else "**no**")]
                    if ok is False:
                        missed.append(f"{label} {mlabel}")
            w("| " + " | ".join(line) + " |")
    w("")
    w(
        "Figures are medians over rounds; ratios are medians of per-round ratios "
        "(servers run back to back in each round), with [min–max] over rounds. "
        f"Throughput ratios: higher is better for {subject}; latency ratios: lower is better."
    )
    if targets:
        w("")
        if missed:
            w(f"Targets missed vs {REFERENCE}: " + "; ".join(missed) + ".")
        else:
            w(f"All targets vs {REFERENCE} met in this run.")

    if cpu:
        w("")
        w("Server CPU seconds (user+system) per cell, median over rounds "
          "(includes ramp time and start-up; fio and the server share the same cores):")
        w("")
        w("| Row | " + " | ".join(servers) + " |")
        w("|---|" + "|".join(["---:"] * len(servers)) + "|")
        for row, label, _kind in rows:
            vals = [cpu.get(row, {}).get(s) for s in servers]
            w("| " + label + " | "
              + " | ".join(fmt(statistics.median(v) if v else None, "cpu") for v in vals) + " |")

    if failures:
        w("")
        w("Failed cells:")
        for f in failures:
            w(f"- {f}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
