#!/usr/bin/env python3
"""Render one run of benches/replication-bench.sh as a markdown report.

    benches/harness_report.py RUN_DIR [PLOT_PREFIX]

RUN_DIR holds what the harness wrote:

  meta.tsv    key<TAB>value lines (machine, versions, parameters), in order
  rows.tsv    row<TAB>label<TAB>kind          kind: iops | iops+lat | bw
  cells.tsv   row round server status json cpu_primary cpu_secondary cached note
              one line per fio run; server is file, serve, nbdkit, qemu-nbd
              or a pair PROTOCOL@RTTms; status is "ok" or why it failed
  resync.tsv  rtt.tsv     rtt_ms measured_us   (the link's measured round trip)
  resync.tsv  rtt_ms bytes seconds status
  sizes.tsv   size_gib create_md_s startup_s rss_up_kib rss_after_kib hwm_kib status
  *.json      raw fio output, one file per cell

With PLOT_PREFIX and gnuplot installed, plots are written as
PLOT_PREFIX-latency.png, -throughput.png and -sizes.png and linked from the
report (by file name: they sit next to it). Only the standard library is
used; figures are medians over rounds and ratios medians of per-round ratios
(see docs/benchmarks.md).
"""

import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_report import fio_numbers, fmt, ratio_text, read_tsv  # noqa: E402

BASELINES = ["file", "serve", "nbdkit", "qemu-nbd"]
BASELINE_NAMES = {
    "file": "fio on the file",
    "serve": "tandem serve",
    "nbdkit": "nbdkit file",
    "qemu-nbd": "qemu-nbd",
}
# Issue targets: protocol C QD1 p50 within local + RTT + remote + 100 µs;
# protocol A QD1 p50 at most 1.1 × serve's.
SLACK_US = 100.0
A_TARGET = 1.10


def load(path):
    return read_tsv(path) if os.path.exists(path) else []


def pair_of(server):
    """('C', 5) for 'C@5ms', None for a baseline."""
    if "@" not in server:
        return None
    proto, rtt = server.split("@", 1)
    return proto, int(rtt.removesuffix("ms"))


class Run:
    def __init__(self, run_dir):
        self.dir = run_dir
        self.meta = load(os.path.join(run_dir, "meta.tsv"))
        self.meta_d = {kv[0]: kv[1] if len(kv) > 1 else "" for kv in self.meta}
        self.rows = load(os.path.join(run_dir, "rows.tsv"))
        self.servers = [s for s in self.meta_d.get("servers", "").split(",") if s]
        self.baselines = [s for s in self.servers if s in BASELINES]
        pairs = [pair_of(s) for s in self.servers if pair_of(s)]
        self.protocols = sorted({p for p, _ in pairs})
        self.rtts = sorted({r for _, r in pairs})
        self.results, self.cpu, self.failures, self.notes = {}, {}, [], []
        for cell in load(os.path.join(run_dir, "cells.tsv")):
            cell += [""] * (9 - len(cell))
            row, rnd, server, status, jpath, cpu_p, cpu_s, _cached, note = cell[:9]
            slot = self.results.setdefault(row, {}).setdefault(server, {})
            if note:
                self.notes.append(f"{row} / {server} / round {rnd}: {note}")
            if status != "ok":
                slot[rnd] = status
                self.failures.append(f"{row} / {server} / round {rnd}: {status}")
                continue
            try:
                slot[rnd] = fio_numbers(os.path.join(run_dir, jpath))
            except (OSError, ValueError, KeyError) as e:
                slot[rnd] = f"unreadable fio output ({e})"
                self.failures.append(f"{row} / {server} / round {rnd}: {slot[rnd]}")
                continue
            if cpu_p:
                self.cpu.setdefault(row, {}).setdefault(server, []).append(
                    (float(cpu_p), float(cpu_s) if cpu_s else None))
        # Every probe of each RTT setting (one at the start, then one before
        # each QD1 pair cell at that RTT); the limits use their median.
        self.rtt_probes = {}
        for r in load(os.path.join(run_dir, "rtt.tsv")):
            if len(r) > 1 and r[1]:
                self.rtt_probes.setdefault(int(r[0]), []).append(float(r[1]))
        self.rtt_us = {r: statistics.median(v) for r, v in self.rtt_probes.items()}
        self.resync = load(os.path.join(run_dir, "resync.tsv"))
        self.sizes = load(os.path.join(run_dir, "sizes.tsv"))
        for r in self.resync:
            if len(r) > 3 and r[3] != "ok":
                self.failures.append(f"resync at RTT {r[0]} ms: {r[3]}")
        for r in self.sizes:
            if len(r) > 6 and r[6] != "ok":
                self.failures.append(f"size {r[0]} GiB: {r[6]}")

    def values(self, row, server, metric):
        per_round = self.results.get(row, {}).get(server, {})
        return {r: v[metric] for r, v in per_round.items()
                if isinstance(v, dict) and v[metric] is not None}

    def median(self, row, server, metric):
        vals = list(self.values(row, server, metric).values())
        return statistics.median(vals) if vals else None

    def ratios(self, row, a, b, metric):
        va, vb = self.values(row, a, metric), self.values(row, b, metric)
        return [va[r] / vb[r] for r in sorted(va) if r in vb and vb[r] > 0]

    def ratio(self, row, a, b, metric):
        rs = self.ratios(row, a, b, metric)
        return statistics.median(rs) if rs else None


def metrics_of(kind):
    out = []
    if kind.startswith("iops"):
        out.append(("iops", "IOPS"))
    if kind == "bw":
        out.append(("mbps", "MB/s"))
    if kind.endswith("+lat"):
        out += [("p50", "p50 latency µs"), ("p99", "p99 latency µs")]
    return out


def row_info(run, row_id):
    for row, label, kind in run.rows:
        if row == row_id:
            return label, kind
    return None


def render(run, plots):
    out = []
    w = out.append
    w(f"# Replication benchmark: {run.meta_d.get('date', '?')}")
    w("")
    for kv in run.meta:
        if kv[0] not in ("date", "servers", "rtts"):
            w(f"- **{kv[0]}**: {kv[1] if len(kv) > 1 else ''}")
    w("")
    w("Figures are medians over rounds; a ratio is the median of per-round ratios "
      "(the servers ran back to back in each round), with [min–max] over rounds "
      "when there was more than one. Latency is fio's submit-to-completion time.")

    if run.baselines:
        w("")
        w("## Baselines (no replication)")
        w("")
        head = ["Row", "Metric"] + [BASELINE_NAMES[b] for b in run.baselines]
        if "serve" in run.baselines and "nbdkit" in run.baselines:
            head.append("serve/nbdkit")
        w("| " + " | ".join(head) + " |")
        w("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        for row, label, kind in run.rows:
            for metric, mlabel in metrics_of(kind):
                line = [label, mlabel] + [fmt(run.median(row, b, metric), metric)
                                          for b in run.baselines]
                if len(head) > 2 + len(run.baselines):
                    line.append(ratio_text(run.ratios(row, "serve", "nbdkit", metric)))
                w("| " + " | ".join(line) + " |")

    if run.protocols:
        w("")
        w("## Replication: protocol × link round-trip time")
        w("")
        base = "serve" if "serve" in run.baselines else None
        w("Each cell: the pair's figure" + (", then its ratio to `tandem serve` "
          "in the same round" if base else "") + ".")
        for row, label, kind in run.rows:
            for metric, mlabel in metrics_of(kind):
                w("")
                w(f"**{label}, {mlabel}**" + (f" (serve: {fmt(run.median(row, base, metric), metric)})"
                                             if base else ""))
                w("")
                w("| protocol | " + " | ".join(f"RTT {r} ms" for r in run.rtts) + " |")
                w("|---|" + "|".join(["---:"] * len(run.rtts)) + "|")
                for p in run.protocols:
                    line = [p]
                    for r in run.rtts:
                        s = f"{p}@{r}ms"
                        v = fmt(run.median(row, s, metric), metric)
                        if base and run.ratios(row, s, base, metric):
                            v += f" ({ratio_text(run.ratios(row, s, base, metric))}×)"
                        line.append(v)
                    w("| " + " | ".join(line) + " |")

    render_limits(run, w)
    render_issue4_targets(run, w)
    render_resync(run, w)
    render_sizes(run, w)
    render_cpu(run, w)

    if plots:
        w("")
        w("## Plots")
        w("")
        for name, caption in plots:
            w(f"![{caption}]({name})")
            w("")

    n_pair = sum(1 for row in run.results.values() for s, rounds in row.items()
                 if pair_of(s) for v in rounds.values() if isinstance(v, dict))
    if n_pair:
        w("")
        w(f"Replication check: after each of the {n_pair} pair cells that ran, both nodes "
          "were Connected and UpToDate/UpToDate with 0 bytes out of sync (a cell where "
          "this did not hold is listed as failed), and the Secondary had written as many "
          "KiB as the Primary (`dw` of `status r0 --json`) unless noted below.")
    if run.notes:
        w("")
        w("Notes:")
        for n in run.notes:
            w(f"- {n}")
    if run.failures:
        w("")
        w("Failed cells:")
        for f in run.failures:
            w(f"- {f}")
    return "\n".join(out)


def render_limits(run, w):
    qd1 = "randwrite-4k-qd1"
    if not run.protocols or row_info(run, qd1) is None:
        return
    w("")
    w("## Against the limits")
    w("")
    w("Protocol C completes a write when it is on the Primary's disk *and* the "
      "Secondary has written it, so its floor is the local write (serve's QD1 p50: "
      "the same NBD path with no replication), plus one link round trip, plus the "
      "Secondary's write of the block (the file's QD1 p50: a `pwrite` into the page "
      "cache). The target allows 100 µs on top for the link protocol itself. Protocol "
      "A completes once the block is queued to the link, so it should cost no more "
      "than serve (target: p50 ≤ 1.1 × serve's at every RTT, while the send buffer "
      "has room, which it always has at QD1). Protocol B adds one way of the link "
      "and the Secondary's receive. The RTT in the limit is the one measured "
      "through the same proxy set-up (a 4 KiB message and a 16-byte answer, "
      "median of 200, probed at the start and again before each QD1 pair cell "
      "at that RTT; the median of those probes, with their range): the proxy "
      "itself overshoots its delay by about a tenth of a millisecond per "
      "direction on this VM (thread wake-ups), and that is not tandem's cost.")
    idle = [r for r in run.rtts if r > 0 and run.median(qd1, f"serve-idle{r}ms", "p50") is not None
            and run.median(qd1, f"file-idle{r}ms", "p50") is not None]
    if idle:
        w("")
        w("At an RTT of some milliseconds the machine sits idle while each write waits "
          "for its ack, and every process on the write's path (fio, both daemons) then "
          "wakes from that idle, which on this VM costs more than a wake-up in a busy "
          "loop. So the two baselines are also measured with fio idle for the RTT "
          "between writes (`--thinktime`), and *C limit, idle* is built from those: "
          "the same sum, with each term measured the way the pair runs it. *C limit* "
          "is the sum from the baselines run back to back, as the issue states it.")
    w("")
    serve = run.median(qd1, "serve", "p50")
    remote = run.median(qd1, "file", "p50")
    head = ["RTT setting", "measured RTT", "local write p50 (serve)", "remote write p50 (file)",
            "C limit", "C p50", "C met"]
    if idle:
        head += ["serve, idle", "file, idle", "C limit, idle", "C met, idle"]
    if "A" in run.protocols:
        head += ["A p50", "A/serve", "A met"]
    w("| " + " | ".join(head) + " |")
    w("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    verdicts = []
    for r in run.rtts:
        rtt = run.rtt_us.get(r, r * 1000.0)
        probes = run.rtt_probes.get(r, [])
        measured = fmt(run.rtt_us.get(r), "p50")
        if len(probes) > 1:
            measured += f" [{fmt(min(probes), 'p50')}–{fmt(max(probes), 'p50')}]"
        line = [f"{r} ms", measured, fmt(serve, "p50"), fmt(remote, "p50")]
        c = run.median(qd1, f"C@{r}ms", "p50")
        if serve is not None and remote is not None:
            limit = serve + rtt + remote + SLACK_US
            line.append(fmt(limit, "p50"))
            if c is not None:
                ok = c <= limit
                line += [fmt(c, "p50"), "yes" if ok else "**no**"]
                verdicts.append(f"C at {r} ms: {c:.0f} µs vs limit {limit:.0f} µs "
                                + ("met" if ok else "**not met**"))
            else:
                line += ["—", ""]
        else:
            line += ["—", fmt(c, "p50"), ""]
        if idle:
            s_idle = run.median(qd1, f"serve-idle{r}ms", "p50") if r in idle else serve
            f_idle = run.median(qd1, f"file-idle{r}ms", "p50") if r in idle else remote
            if s_idle is not None and f_idle is not None:
                limit = s_idle + rtt + f_idle + SLACK_US
                line += [fmt(s_idle, "p50"), fmt(f_idle, "p50"), fmt(limit, "p50")]
                if c is not None:
                    ok = c <= limit
                    line.append("yes" if ok else "**no**")
                    if r in idle:
                        verdicts.append(f"C at {r} ms against the idle baselines: {c:.0f} µs "
                                        f"vs limit {limit:.0f} µs "
                                        + ("met" if ok else "**not met**"))
                else:
                    line.append("")
            else:
                line += ["—", "—", "—", ""]
        if "A" in run.protocols:
            a = run.median(qd1, f"A@{r}ms", "p50")
            ra = run.ratio(qd1, f"A@{r}ms", "serve", "p50")
            ok = ra is not None and ra <= A_TARGET
            line += [fmt(a, "p50"), ratio_text(run.ratios(qd1, f"A@{r}ms", "serve", "p50")),
                     ("yes" if ok else "**no**") if ra is not None else ""]
            if ra is not None:
                verdicts.append(f"A at {r} ms: {ra:.2f} × serve "
                                + ("met" if ok else "**not met**"))
        w("| " + " | ".join(line) + " |")
    if verdicts:
        w("")
        w("Targets: " + "; ".join(verdicts) + ".")

    rows = [(x, m) for x, m in (("randwrite-4k-qd32", "iops"), ("write-1m-seq", "mbps"))
            if row_info(run, x)]
    if rows and ("file" in run.baselines or "serve" in run.baselines):
        w("")
        w("Throughput against the raw backing file (fio on the file, the most any "
          "server can do here) and against serve (the NBD path alone): a pair moves "
          "every byte twice, over the link and onto a second file on the same disk "
          "and CPUs, so on one machine it cannot reach the file's figure.")
        w("")
        head = ["row", "protocol"] + [f"RTT {r} ms: /file, /serve" for r in run.rtts]
        w("| " + " | ".join(head) + " |")
        w("|" + "|".join(["---", "---"] + ["---:"] * len(run.rtts)) + "|")
        for x, m in rows:
            label, _ = row_info(run, x)
            for p in run.protocols:
                line = [label, p]
                for r in run.rtts:
                    s = f"{p}@{r}ms"
                    parts = [ratio_text(run.ratios(x, s, b, m)) if run.ratios(x, s, b, m) else "—"
                             for b in ("file", "serve")]
                    line.append(", ".join(parts))
                w("| " + " | ".join(line) + " |")


def render_issue4_targets(run, w):
    """The replication engine's targets: protocol C at RTT 0 against serve."""
    if "C" not in run.protocols or 0 not in run.rtts or "serve" not in run.baselines:
        return
    verdicts = []
    for x, m, target in (("write-1m-seq", "mbps", 0.80), ("randwrite-4k-qd32", "iops", 0.50)):
        info = row_info(run, x)
        if info is None:
            continue
        med = run.ratio(x, "C@0ms", "serve", m)
        ok = med is not None and med >= target
        verdicts.append(f"{info[0]}: C/serve " + ("—" if med is None else f"{med:.2f}")
                        + f" (target ≥ {target:.2f}) " + ("met" if ok else "**not met**"))
    if verdicts:
        w("")
        w("Replication engine targets (protocol C at RTT 0 against serve, same run): "
          + "; ".join(verdicts) + ".")


def render_resync(run, w):
    rows = [r for r in run.resync if r]
    if not rows:
        return
    file_mbps = run.median("write-1m-seq", "file", "mbps")
    w("")
    w("## Resync throughput")
    w("")
    w("`invalidate-remote` on the Primary of a protocol C pair (resync-rate 4 GiB/s, "
      "no client I/O), timed until the Secondary is UpToDate: the whole device is read "
      "on one node, crosses the (delayed) link and is written on the other. Limit: the "
      "raw file's 1 MiB sequential write rate"
      + (f" ({file_mbps:,.0f} MB/s in this run)" if file_mbps else "") + ".")
    w("")
    w("| RTT | bytes | seconds | MB/s | /file write |")
    w("|---|---:|---:|---:|---:|")
    for r in rows:
        r += [""] * (4 - len(r))
        rtt, nbytes, secs, status = r[:4]
        if status == "ok" and secs:
            mbps = int(nbytes) / float(secs) / 1e6
            rel = f"{mbps / file_mbps:.2f}" if file_mbps else "—"
            w(f"| {rtt} ms | {int(nbytes):,} | {float(secs):.2f} | {mbps:,.0f} | {rel} |")
        else:
            w(f"| {rtt} ms | {nbytes} | — | — | {status} |")


def render_sizes(run, w):
    rows = [r for r in run.sizes if r]
    if not rows:
        return
    w("")
    w("## Memory and start-up against device size")
    w("")
    w("Sparse backing files, protocol C, RTT 0. *create-md*: the verb on one node. "
      "*start-up*: from spawning the daemon to `dstate` answering with the disk "
      "attached (metadata read, activity log replayed, bitmap loaded). *RSS*: the "
      "Primary's resident memory once the pair is up and Primary, then after 4 KiB "
      "random writes over the whole device (QD32, up to 5 s), and its peak.")
    w("")
    w("| device | create-md s | start-up s | RSS up MiB | RSS after writes MiB | peak MiB |")
    w("|---:|---:|---:|---:|---:|---:|")

    def mib(v):
        return f"{int(v) / 1024:.1f}" if v else "—"

    for r in rows:
        r += [""] * (7 - len(r))
        g, cmd, start, up, after, hwm, status = r[:7]
        size = f"{int(g) // 1024} TiB" if int(g) % 1024 == 0 else f"{g} GiB"
        if status != "ok":
            w(f"| {size} | {cmd or '—'} | {start or '—'} | — | — | {status} |")
        else:
            w(f"| {size} | {cmd} | {start} | {mib(up)} | {mib(after)} | {mib(hwm)} |")


def render_cpu(run, w):
    if not run.cpu:
        return
    servers = [s for s in run.servers if not s.startswith("file")]
    w("")
    w("CPU seconds (user+system) per cell, median over rounds, including ramp time "
      "and set-up; for a pair, Primary + Secondary (fio, the daemons and the proxies "
      "share the same cores):")
    w("")
    w("| Row | " + " | ".join(servers) + " |")
    w("|---|" + "|".join(["---:"] * len(servers)) + "|")
    for row, label, _kind in run.rows:
        line = [label]
        for s in servers:
            v = run.cpu.get(row, {}).get(s)
            if not v:
                line.append("—")
            elif not pair_of(s):
                line.append(fmt(statistics.median(x[0] for x in v), "cpu"))
            else:
                p = statistics.median(x[0] for x in v)
                q = [x[1] for x in v if x[1] is not None]
                line.append(f"{fmt(p, 'cpu')} + {fmt(statistics.median(q), 'cpu') if q else '—'}")
        w("| " + " | ".join(line) + " |")


def make_plots(run, prefix):
    """Write the plots with gnuplot; return [(file name, caption)]."""
    if not prefix or not shutil.which("gnuplot") or not run.protocols:
        return []
    data_dir = os.path.join(run.dir, "plot-data")
    os.makedirs(data_dir, exist_ok=True)
    made = []
    script = ["set terminal pngcairo size 900,520 font 'sans,10'",
              "set key inside top left", "set grid", "set datafile missing '-'"]

    def dat(name, header, lines):
        path = os.path.join(data_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("# " + " ".join(header) + "\n")
            for line in lines:
                f.write(" ".join("-" if v is None else f"{v:g}" for v in line) + "\n")
        return path

    def series(row, metric):
        return [[r] + [run.median(row, f"{p}@{r}ms", metric) for p in run.protocols]
                for r in run.rtts]

    def plot_lines(path, extra=()):
        cols = [f"'{path}' using 1:{i + 2} with linespoints title 'protocol {p}'"
                for i, p in enumerate(run.protocols)]
        return "plot " + ", ".join(cols + list(extra))

    qd1 = "randwrite-4k-qd1"
    if row_info(run, qd1):
        path = dat("latency.dat", ["rtt"] + run.protocols, series(qd1, "p50"))
        serve = run.median(qd1, "serve", "p50")
        remote = run.median(qd1, "file", "p50")
        extra = []
        if serve is not None:
            extra.append(f"{serve:g} with lines dashtype 2 title 'serve (no replication)'")
            if remote is not None:
                lim = dat("limit.dat", ["rtt", "limit_us"],
                          [[r, serve + run.rtt_us.get(r, r * 1000.0) + remote + SLACK_US]
                           for r in run.rtts])
                extra.append(f"'{lim}' using 1:2 with lines dashtype 3 "
                             "title 'C limit: local + measured RTT + remote + 100 µs'")
        out = f"{prefix}-latency.png"
        script += [f"set output '{out}'", "set title '4 KiB random write, QD1: p50 latency'",
                   "set xlabel 'link RTT (ms)'", "set ylabel 'µs'", "set logscale y",
                   plot_lines(path, extra), "unset logscale y"]
        made.append((os.path.basename(out), "QD1 write p50 latency against link RTT"))

    panels = [(x, m, t) for x, m, t in (
        ("randwrite-4k-qd32", "iops", "4 KiB random write, QD32: IOPS"),
        ("write-1m-seq", "mbps", "1 MiB sequential write, QD8: MB/s")) if row_info(run, x)]
    if panels:
        out = f"{prefix}-throughput.png"
        script += [f"set output '{out}'", f"set multiplot layout 1,{len(panels)}",
                   "set key inside top right"]
        for x, m, t in panels:
            path = dat(f"{x}.dat", ["rtt"] + run.protocols, series(x, m))
            extra = []
            for b, dash in (("serve", 2), ("file", 3)):
                v = run.median(x, b, m)
                if v is not None:
                    extra.append(f"{v:g} with lines dashtype {dash} title '{BASELINE_NAMES[b]}'")
            script += [f"set title '{t}'", "set xlabel 'link RTT (ms)'", "set ylabel ''",
                       "set yrange [0:*]", plot_lines(path, extra)]
        script += ["unset multiplot", "set autoscale y", "set key inside top left"]
        made.append((os.path.basename(out), "throughput against link RTT"))

    sized = [r for r in run.sizes if len(r) > 6 and r[6] == "ok"]
    if sized:
        path = dat("sizes.dat", ["gib", "startup_s", "rss_up_mib", "hwm_mib"],
                   [[int(r[0]), float(r[2]), int(r[3]) / 1024, int(r[5]) / 1024] for r in sized])
        out = f"{prefix}-sizes.png"
        script += [f"set output '{out}'", "set multiplot layout 1,2", "set logscale x 2",
                   "set xlabel 'device size (GiB)'", "set key inside top left",
                   "set title 'Primary resident memory'", "set ylabel 'MiB'", "set yrange [0:*]",
                   f"plot '{path}' using 1:3 with linespoints title 'after start-up', "
                   f"'{path}' using 1:4 with linespoints title 'peak after writes'",
                   "set title 'daemon start-up'", "set ylabel 's'",
                   f"plot '{path}' using 1:2 with linespoints title 'spawn to disk attached'",
                   "unset multiplot", "unset logscale x"]
        made.append((os.path.basename(out), "memory and start-up against device size"))

    gp = os.path.join(data_dir, "plots.gp")
    with open(gp, "w", encoding="utf-8") as f:
        f.write("\n".join(script) + "\n")
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        print(f"harness_report: gnuplot failed: {r.stderr.strip()}", file=sys.stderr)
        return []
    return made


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    run = Run(sys.argv[1])
    plots = make_plots(run, sys.argv[2] if len(sys.argv) == 3 else None)
    print(render(run, plots))


if __name__ == "__main__":
    main()
