#!/usr/bin/env bash
# Replication benchmark: fio through NBD against `tandem serve` (no
# replication, the baseline) and against the Primary of a two-node tandem
# pair on loopback with protocol A, B and C, all in one run, one server at a
# time, interleaved per row so that they are compared side by side.
#
#   benches/replication-bench.sh                 full run (10 s cells, 3 rounds)
#   benches/replication-bench.sh --quick         smoke run (3 s cells, 1 round, 256 MiB)
#   benches/replication-bench.sh --protocols C
#
# Options (each also settable through the environment variable shown):
#   --quick              3 s cells, 1 s ramp, 1 round, 256 MiB (unless set otherwise)
#   --protocols LIST     comma-separated subset of A,B,C   [BENCH_PROTOCOLS, A,B,C]
#   --rounds N           rounds per row; figures are medians  [BENCH_ROUNDS, 3]
#   --runtime S          measured seconds per cell             [BENCH_RUNTIME, 10]
#   --ramp S             unmeasured warm-up seconds per cell   [BENCH_RAMP, 2]
#   --size-mib N         size of each backing file in MiB      [BENCH_SIZE_MIB, 1024]
#   --rows LIST          comma-separated subset of the row ids: write-1m-seq,
#                        randwrite-4k-qd32, randwrite-4k-qd1    [BENCH_ROWS, all]
#   --work-dir DIR       backing files, raw fio JSON and logs  [BENCH_WORK_DIR, benches/work]
#   --no-build           use the existing target/release/tandem
#   --report RUN_DIR     only render the report of an earlier run again
#
# The markdown report goes to stdout and to benches/results/replication-<date>.md
# (replication-<date>-quick.md for --quick); progress goes to stderr. The raw
# fio JSON, the daemons' logs and configuration (one directory per cell) and
# the inputs of the report stay in <work-dir>/runs/replication-<date>/.
# Exit status: 0 when every cell ran, 1 when a cell failed, 2 on bad usage.
# Backquotes in single-quoted strings below are markdown, not expansions.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

usage() { sed -n '2,/^# Exit status/p' "$0" | sed -e 's/^# \{0,1\}//'; }
die() { echo "replication-bench: $*" >&2; exit 2; }
log() { echo "[replication-bench $(date +%H:%M:%S)] $*" >&2; }

quick=0
build=1
report_only=""
protocols="${BENCH_PROTOCOLS:-A,B,C}"
rounds="${BENCH_ROUNDS:-}"
runtime="${BENCH_RUNTIME:-}"
ramp="${BENCH_RAMP:-}"
size_mib="${BENCH_SIZE_MIB:-}"
only_rows="${BENCH_ROWS:-}"
work="${BENCH_WORK_DIR:-benches/work}"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    --protocols) protocols="${2:?--protocols needs a list}"; shift ;;
    --protocols=*) protocols="${1#*=}" ;;
    --rounds) rounds="${2:?--rounds needs N}"; shift ;;
    --rounds=*) rounds="${1#*=}" ;;
    --runtime) runtime="${2:?--runtime needs S}"; shift ;;
    --runtime=*) runtime="${1#*=}" ;;
    --ramp) ramp="${2:?--ramp needs S}"; shift ;;
    --ramp=*) ramp="${1#*=}" ;;
    --size-mib) size_mib="${2:?--size-mib needs N}"; shift ;;
    --size-mib=*) size_mib="${1#*=}" ;;
    --rows) only_rows="${2:?--rows needs a list}"; shift ;;
    --rows=*) only_rows="${1#*=}" ;;
    --work-dir) work="${2:?--work-dir needs DIR}"; shift ;;
    --work-dir=*) work="${1#*=}" ;;
    --report) report_only="${2:?--report needs RUN_DIR}"; shift ;;
    --report=*) report_only="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
if [ "$quick" -eq 1 ]; then
  : "${rounds:=1}" "${runtime:=3}" "${ramp:=1}" "${size_mib:=256}"
else
  : "${rounds:=3}" "${runtime:=10}" "${ramp:=2}" "${size_mib:=1024}"
fi
for n in rounds runtime size_mib; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, not '${!n}'"
done
[[ "$ramp" =~ ^[0-9]+$ ]] || die "ramp must be a whole number of seconds, not '$ramp'"
[ "$size_mib" -ge 16 ] || die "size-mib must be at least 16 (the pair's metadata takes the end of each file)"

IFS=, read -r -a protocol_list <<<"$protocols"
[ ${#protocol_list[@]} -gt 0 ] || die "--protocols is empty"
for p in "${protocol_list[@]}"; do
  case "$p" in A|B|C) ;; *) die "unknown protocol '$p' (A, B, C)" ;; esac
done
# The servers of a round: the baseline, then one pair per protocol.
server_list=(serve "${protocol_list[@]}")
servers=$(IFS=,; echo "${server_list[*]}")

# ---------------------------------------------------------------- report
# render_report RUN_DIR: the markdown report of a run directory on stdout.
# It reuses the fio parsing and formatting of benches/fio_report.py.
render_report() {
  PYTHONDONTWRITEBYTECODE=1 python3 - "$repo/benches" "$1" <<'EOF'
import os
import statistics
import sys

sys.path.insert(0, sys.argv[1])
from fio_report import fio_numbers, fmt, ratio_text, read_tsv  # noqa: E402

run_dir = sys.argv[2]
BASE = "serve"
# The issue's targets, protocol C over serve measured in the same run.
TARGETS = {("write-1m-seq", "mbps"): 0.80, ("randwrite-4k-qd32", "iops"): 0.50}
SUBJECT = "C"

meta = read_tsv(os.path.join(run_dir, "meta.tsv"))
meta_d = {kv[0]: kv[1] if len(kv) > 1 else "" for kv in meta}
rows = read_tsv(os.path.join(run_dir, "rows.tsv"))
cells = read_tsv(os.path.join(run_dir, "cells.tsv"))
servers = [s for s in meta_d.get("servers", "").split(",") if s]
pairs = [s for s in servers if s != BASE]


def name(s):
    return "serve" if s == BASE else f"protocol {s}"


results, cpu, failures, notes = {}, {}, [], []
for cell in cells:
    cell += [""] * (9 - len(cell))
    row, rnd, server, status, jpath, cpu_p, cpu_s, _cached, note = cell[:9]
    slot = results.setdefault(row, {}).setdefault(server, {})
    if note:
        notes.append(f"{row} / {name(server)} / round {rnd}: {note}")
    if status != "ok":
        slot[rnd] = status
        failures.append(f"{row} / {name(server)} / round {rnd}: {status}")
        continue
    try:
        slot[rnd] = fio_numbers(os.path.join(run_dir, jpath))
    except (OSError, ValueError, KeyError) as e:
        slot[rnd] = f"unreadable fio output ({e})"
        failures.append(f"{row} / {name(server)} / round {rnd}: {slot[rnd]}")
        continue
    if cpu_p:
        cpu.setdefault(row, {}).setdefault(server, []).append(
            (float(cpu_p), float(cpu_s) if cpu_s else None))


def values(row, server, metric):
    per_round = results.get(row, {}).get(server, {})
    return {r: v[metric] for r, v in per_round.items()
            if isinstance(v, dict) and v[metric] is not None}


def median(row, server, metric):
    vals = list(values(row, server, metric).values())
    return statistics.median(vals) if vals else None


def ratios(row, a, b, metric):
    va, vb = values(row, a, metric), values(row, b, metric)
    return [va[r] / vb[r] for r in sorted(va) if r in vb and vb[r] > 0]


out = []
w = out.append
w(f"# Replication benchmark: {meta_d.get('date', '?')}")
w("")
for kv in meta:
    if kv[0] != "date":
        w(f"- **{kv[0]}**: {kv[1] if len(kv) > 1 else ''}")
w("")

has_base = BASE in servers
targets = has_base and SUBJECT in servers
head = ["Row", "Metric"] + [name(s) for s in servers]
if has_base:
    head += [f"{s}/serve" for s in pairs]
if targets:
    head += ["target C/serve", "met"]
w("| " + " | ".join(head) + " |")
w("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
verdicts = []
for row, label, kind in rows:
    metrics = []
    if kind.startswith("iops"):
        metrics.append(("iops", "IOPS"))
    if kind == "bw":
        metrics.append(("mbps", "MB/s"))
    if kind.endswith("+lat"):
        metrics += [("p50", "p50 latency µs"), ("p99", "p99 latency µs")]
    for metric, mlabel in metrics:
        line = [label, mlabel] + [fmt(median(row, s, metric), metric) for s in servers]
        if has_base:
            line += [ratio_text(ratios(row, s, BASE, metric)) for s in pairs]
        if targets:
            target = TARGETS.get((row, metric))
            if target is None:
                line += ["", ""]
            else:
                rs = ratios(row, SUBJECT, BASE, metric)
                med = statistics.median(rs) if rs else None
                ok = med is not None and med >= target
                line += [f"≥ {target:.2f}", "yes" if ok else "**no**"]
                verdicts.append(
                    f"{label} {mlabel}: C/serve "
                    + ("—" if med is None else f"{med:.2f}")
                    + f" (target ≥ {target:.2f}) " + ("met" if ok else "**not met**"))
        w("| " + " | ".join(line) + " |")
w("")
w("Figures are medians over rounds; ratios are medians of per-round ratios "
  "(all servers run back to back in each round), with [min–max] over rounds. "
  "IOPS and MB/s ratios: higher is better for the pair; latency ratios: "
  "lower is better (a ratio of 2 means twice serve's latency).")
if verdicts:
    w("")
    w("Targets (protocol C vs serve, same run): " + "; ".join(verdicts) + ".")

if cpu:
    w("")
    w("CPU seconds (user+system) per cell, median over rounds, includes ramp "
      "time and set-up; for a pair, Primary + Secondary (fio and both daemons "
      "share the same cores):")
    w("")
    w("| Row | " + " | ".join(name(s) for s in servers) + " |")
    w("|---|" + "|".join(["---:"] * len(servers)) + "|")
    for row, label, _kind in rows:
        line = [label]
        for s in servers:
            v = cpu.get(row, {}).get(s)
            if not v:
                line.append("—")
            elif s == BASE:
                line.append(fmt(statistics.median(x[0] for x in v), "cpu"))
            else:
                p = statistics.median(x[0] for x in v)
                q = statistics.median(x[1] for x in v if x[1] is not None)
                line.append(f"{fmt(p, 'cpu')} + {fmt(q, 'cpu')}")
        w("| " + " | ".join(line) + " |")

n_pair_cells = sum(1 for c in cells if c[2] != BASE and c[3] == "ok")
w("")
w(f"Replication check: after each of the {n_pair_cells} pair cells that ran, both "
  "nodes were Connected and UpToDate/UpToDate with 0 bytes out of sync (a cell "
  "where this did not hold is listed as failed), and the Secondary had written as "
  "many KiB as the Primary (`dw` of `status r0 --json`) unless noted below.")
if notes:
    w("")
    w("Notes:")
    for n in notes:
        w(f"- {n}")
if failures:
    w("")
    w("Failed cells:")
    for f in failures:
        w(f"- {f}")
print("\n".join(out))
EOF
}

if [ -n "$report_only" ]; then
  [ -f "$report_only/meta.tsv" ] || die "$report_only has no meta.tsv (not a run directory)"
  render_report "$report_only"
  exit 0
fi

# ---------------------------------------------------------------- tools
# The same Debian packages scripts/test.sh installs.
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    die "missing tools: install the Debian packages ${missing[*]}"
  fi
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the report"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (Debian's fio has it)"

tandem_bin="${CARGO_TARGET_DIR:-target}/release/tandem"
if [ "$build" -eq 1 ]; then
  log "cargo build --release -p tandem"
  cargo build --release -p tandem >&2
fi
[ -x "$tandem_bin" ] || die "$tandem_bin not found (build it or drop --no-build)"
tandem_bin=$(cd "$(dirname "$tandem_bin")" && pwd)/tandem

# ---------------------------------------------------------------- work dir
stamp=$(date +%Y-%m-%d-%H%M%S)
mkdir -p "$work"
work=$(cd "$work" && pwd)
suffix=""
[ "$quick" -eq 1 ] && suffix="-quick"
run_dir="$work/runs/replication-$stamp$suffix"
mkdir -p "$run_dir/cells"
# One backing file for serve and one per node of the pair, reused by every
# cell of the run (the pair's metadata is created afresh in each cell).
img_serve="$work/replication-serve.img"
img_alpha="$work/replication-alpha.img"
img_beta="$work/replication-beta.img"
results_dir="$repo/benches/results"
mkdir -p "$results_dir"
report="$results_dir/replication-$stamp$suffix.md"

# ---------------------------------------------------------------- servers
serve_pid=""     # the running `tandem serve`, if any
pair_dir=""      # the cell directory of the running pair, if any
pair_pids=()     # daemon pids of the running pair (alpha, beta), started here
nbd_uri=""       # where fio connects for the current cell
pair_nbd=""      # alpha's NBD port in the current pair
data_size=""     # the pair's replicated size (dump-md data-size)

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
  stop_serve
  stop_pair
  rm -f "$img_serve" "$img_alpha" "$img_beta"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_nbd URI: wait until an NBD handshake on URI succeeds (10 s).
wait_nbd() {
  local i
  for ((i = 0; i < 200; i++)); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  return 1
}

# Whether PID is alive and runs our tandem binary (guards every kill against
# a recycled pid).
is_our_tandem() {
  local exe
  kill -0 "$1" 2>/dev/null || return 1
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [ "${exe% (deleted)}" = "$tandem_bin" ]
}

# stop_pid PID NAME: wait up to 10 s for PID (one of ours) to exit after it was
# asked to stop, then SIGKILL it.
stop_pid() {
  local pid=$1 i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if is_our_tandem "$pid"; then
    log "$2 (pid $pid) still runs 10 s after it was stopped; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# start_serve CELL_DIR: `tandem serve` on the baseline file; sets nbd_uri.
start_serve() {
  local cell=$1 port
  port=$(free_port)
  echo "=== $(date +%T) tandem serve on port $port" >>"$cell/serve.log"
  "$tandem_bin" serve "$img_serve" --listen "127.0.0.1:$port" >>"$cell/serve.log" 2>&1 &
  serve_pid=$!
  nbd_uri="nbd://127.0.0.1:$port"
  if ! wait_nbd "$nbd_uri"; then
    tail -5 "$cell/serve.log" >&2
    log "tandem serve did not answer on port $port within 10 s (log: $cell/serve.log)"
    stop_serve
    return 1
  fi
}

stop_serve() {
  [ -n "$serve_pid" ] || return 0
  local pid=$serve_pid
  serve_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  stop_pid "$pid" "tandem serve"
}

# tcli CELL NODE ARGS...: a tandem verb on NODE of the pair in CELL, at most
# 60 s, its output on stdout and its errors in CELL/cli.log.
tcli() {
  local cell=$1 node=$2
  shift 2
  timeout 60 "$tandem_bin" --config-dir "$cell/etc" --node "$node" --run-dir "$cell/$node" \
    "$@" 2>>"$cell/cli.log"
}

# wait_state CELL NODE VERB EXPECTED: poll `VERB r0` until it prints EXPECTED (30 s).
wait_state() {
  local cell=$1 node=$2 verb=$3 want=$4 got="" i
  for ((i = 0; i < 300; i++)); do
    got=$(tcli "$cell" "$node" "$verb" r0) || got="(failed)"
    [ "$got" = "$want" ] && return 0
    sleep 0.1
  done
  log "$node: \`$verb r0\` is '$got', not '$want', after 30 s (logs: $cell)"
  return 1
}

# start_pair CELL_DIR PROTOCOL: a fresh pair on loopback, as an operator sets
# one up (tests/common/pair.rs): configuration, create-md on both nodes, the
# daemons, Connected, new-current-uuid --clear-bitmap, UpToDate/UpToDate,
# alpha Primary and exporting r0 over NBD. Sets nbd_uri and data_size.
start_pair() {
  local cell=$1 proto=$2 ports=() p node ds
  mkdir -p "$cell/etc" "$cell/alpha" "$cell/beta"
  while [ ${#ports[@]} -lt 4 ]; do
    p=$(free_port)
    [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
  done
  pair_nbd=${ports[2]}
  # Defaults for everything else (net.timeout 6s, ping-int 10s, al-extents
  # 1237); connect-int 1s so that the nodes find each other quickly.
  cat >"$cell/etc/r0.toml" <<TOML
protocol = "$proto"

[net]
shared-secret = "replication-bench"
connect-int = "1s"

[[node]]
name = "alpha"
address = "127.0.0.1:${ports[0]}"
disk = "$img_alpha"
meta-disk = "internal"
nbd = "127.0.0.1:${ports[2]}"

[[node]]
name = "beta"
address = "127.0.0.1:${ports[1]}"
disk = "$img_beta"
meta-disk = "internal"
nbd = "127.0.0.1:${ports[3]}"
TOML
  for node in alpha beta; do
    # --force: the file holds the previous cell's metadata (or random data).
    if ! tcli "$cell" "$node" create-md r0 --force >>"$cell/cli.log"; then
      log "create-md on $node failed: $(tail -1 "$cell/cli.log")"
      return 1
    fi
  done
  ds=$(tcli "$cell" alpha dump-md r0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data-size"])') || {
    log "dump-md on alpha failed: $(tail -1 "$cell/cli.log")"
    return 1
  }
  data_size=$ds
  pair_dir=$cell
  # `tandem run` is the process `tandem up` starts; run here so that this
  # script is its parent and knows its pid without trusting a pid file.
  for node in alpha beta; do
    "$tandem_bin" --config-dir "$cell/etc" --node "$node" --run-dir "$cell/$node" \
      run r0 >>"$cell/$node.log" 2>&1 &
    pair_pids+=("$!")
  done
  if ! { wait_state "$cell" alpha cstate Connected &&
    wait_state "$cell" beta cstate Connected &&
    tcli "$cell" alpha new-current-uuid r0 --clear-bitmap >>"$cell/cli.log" &&
    wait_state "$cell" alpha dstate UpToDate/UpToDate &&
    wait_state "$cell" beta dstate UpToDate/UpToDate &&
    tcli "$cell" alpha primary r0 >>"$cell/cli.log" &&
    wait_state "$cell" alpha role Primary/Secondary &&
    wait_state "$cell" beta role Secondary/Primary; }; then
    log "the protocol $proto pair did not come up; logs in $cell"
    tail -n 3 "$cell/alpha.log" "$cell/beta.log" "$cell/cli.log" >&2 || true
    stop_pair
    return 1
  fi
  nbd_uri="nbd://127.0.0.1:$pair_nbd/r0"
  if ! wait_nbd "$nbd_uri"; then
    log "alpha does not export $nbd_uri; logs in $cell"
    stop_pair
    return 1
  fi
}

# stop_pair: `down r0 --force` on both nodes, then wait for (and, after 10 s,
# kill) the daemons this script started, and only those.
stop_pair() {
  [ -n "$pair_dir" ] || return 0
  local cell=$pair_dir node pid i=0 dpids=()
  pair_dir=""
  for node in alpha beta; do
    tcli "$cell" "$node" down r0 --force >>"$cell/cli.log" &
    dpids+=("$!")
  done
  for pid in "${dpids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  for pid in "${pair_pids[@]}"; do
    i=$((i + 1))
    stop_pid "$pid" "the daemon of node $i"
  done
  pair_pids=()
}

# Share of FILE in the page cache, e.g. "100%".
cached_pct() {
  if command -v fincore >/dev/null 2>&1; then
    fincore --bytes --noheadings --output RES "$1" 2>/dev/null |
      awk -v size="$((size_mib * 1048576))" '{printf "%.0f%%", 100 * $1 / size}'
  else
    echo "unknown (no fincore)"
  fi
}

# CPU seconds (user+system) process PID has used so far.
proc_cpu() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo ""; return; }
  stat=${stat##*) }   # drop "pid (comm) "; fields now start at field 3
  # shellcheck disable=SC2086
  set -- $stat
  python3 -c "import os,sys; print(f'{(int(sys.argv[1]) + int(sys.argv[2])) / os.sysconf(\"SC_CLK_TCK\"):.2f}')" "${12}" "${13}"
}

# check_pair CELL: after fio, both nodes must still be Connected and
# UpToDate/UpToDate with nothing out of sync; the Secondary should have
# written what the Primary wrote (protocol A may need a moment). Saves both
# `status r0 --json` in CELL. Prints "ok" or "bad: why", then a tab and a
# note (empty when all is well).
check_pair() {
  local cell=$1 i verdict=""
  for ((i = 0; i < 50; i++)); do
    tcli "$cell" alpha status r0 --json >"$cell/status.alpha.json" || true
    tcli "$cell" beta status r0 --json >"$cell/status.beta.json" || true
    verdict=$(python3 - "$cell" <<'EOF'
import json, sys
cell = sys.argv[1]
def load(node):
    try:
        return json.load(open(f"{cell}/status.{node}.json"))["resources"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
a, b = load("alpha"), load("beta")
if a is None or b is None:
    print("bad: status r0 --json failed\t")
    sys.exit()
bad = []
for n, s, role in (("alpha", a, "Primary"), ("beta", b, "Secondary")):
    if s["role"] != role or s["cstate"] != "Connected" or s["disk"] != "UpToDate" \
            or s["peer-disk"] != "UpToDate" or s["out-of-sync-bytes"] != 0:
        bad.append(f"{n} {s['role']} {s['cstate']} {s['disk']}/{s['peer-disk']} "
                   f"out-of-sync {s['out-of-sync-bytes']} B")
if bad:
    print("bad: " + "; ".join(bad) + "\t")
elif a["counters"]["dw"] != b["counters"]["dw"]:
    print(f"ok\tSecondary wrote {b['counters']['dw']} KiB, Primary {a['counters']['dw']} KiB "
          f"(Primary sent {a['counters']['ns']} KiB, Secondary received {b['counters']['nr']} KiB)")
else:
    print("ok\t")
EOF
    )
    [ "$verdict" = "ok"$'\t' ] && break
    sleep 0.2
  done
  printf '%s\n' "$verdict"
}

# WARN and ERROR lines the daemons logged so far (the first one, and a count).
log_warnings() {
  local cell=$1 n first
  n=$(cat "$cell/alpha.log" "$cell/beta.log" | grep -c -E ' (WARN|ERROR) ' || true)
  [ "$n" -gt 0 ] || return 0
  first=$(grep -h -m1 -E ' (WARN|ERROR) ' "$cell/alpha.log" "$cell/beta.log" | head -n 1 | tr '\t' ' ')
  echo "$n WARN/ERROR lines in the daemon logs before \`down\`, first: \`$first\`"
}

# ---------------------------------------------------------------- rows
# id | label | fio rw | bs | iodepth | report kind
rows=(
  "write-1m-seq|1 MiB sequential write, QD8|write|1m|8|bw"
  "randwrite-4k-qd32|4 KiB random write, QD32|randwrite|4k|32|iops"
  "randwrite-4k-qd1|4 KiB random write, QD1|randwrite|4k|1|iops+lat"
)
if [ -n "$only_rows" ]; then
  IFS=, read -r -a wanted <<<"$only_rows"
  kept=()
  for w in "${wanted[@]}"; do
    found=0
    for r in "${rows[@]}"; do
      if [ "${r%%|*}" = "$w" ]; then kept+=("$r"); found=1; fi
    done
    [ "$found" -eq 1 ] || die "unknown row '$w' (see --help for the row ids)"
  done
  rows=("${kept[@]}")
fi
: >"$run_dir/rows.tsv"
for r in "${rows[@]}"; do
  IFS='|' read -r id label _rw _bs _qd kind <<<"$r"
  printf '%s\t%s\t%s\n' "$id" "$label" "$kind" >>"$run_dir/rows.tsv"
done

# ---------------------------------------------------------------- backing files
log "writing three ${size_mib} MiB backing files (the same random data, fsynced) in $work"
rm -f "$img_serve" "$img_alpha" "$img_beta"
# Random data, written once and copied: every block of every file is
# allocated, so each write row overwrites allocated blocks, for serve and for
# both nodes alike, and nothing can be read back as a hole.
dd if=/dev/urandom of="$img_serve" bs=1M count="$size_mib" conv=fsync status=none
cp --sparse=never "$img_serve" "$img_alpha"
cp --sparse=never "$img_serve" "$img_beta"
sync

# ---------------------------------------------------------------- metadata
meta="$run_dir/meta.tsv"
first_line() { "$@" 2>&1 | head -n 1; }
rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$repo" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev="$rev+dirty"
{
  printf 'date\t%s\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')"
  printf 'servers\t%s\n' "$servers"
  printf 'command\t`%s`\n' "benches/replication-bench.sh --protocols $protocols --rounds $rounds --runtime $runtime --ramp $ramp --size-mib $size_mib${only_rows:+ --rows $only_rows}"
  printf 'machine\t%s CPUs (%s), %s, kernel %s\n' "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'load average at start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'fio\t%s\n' "$(first_line fio --version)"
  printf 'libnbd\t%s\n' "$(nbdinfo --version 2>&1 | tail -n 1)"
  printf 'tandem\t%s (git %s)\n' "$(first_line "$tandem_bin" --version)" "$rev"
  printf 'serve\t`tandem serve FILE --listen 127.0.0.1:PORT` (no replication)\n'
  printf 'pair\ttwo nodes on this machine, each `tandem --config-dir D --node NODE --run-dir D/NODE run r0` (the daemon `up` starts) on its own backing file with internal metadata; replication link and NBD on 127.0.0.1; fio writes to alpha'"'"'s export r0\n'
  printf 'pair set-up per cell\t`create-md r0 --force` on both, start both, wait Connected, `new-current-uuid r0 --clear-bitmap`, wait UpToDate/UpToDate, `primary r0` on alpha; afterwards `down r0 --force` on both\n'
  printf 'pair configuration\t`protocol` (A, B or C), `net.shared-secret`, `net.connect-int = "1s"`; every other key at its default\n'
  printf 'backing files\t3 × %s MiB (serve, alpha, beta) on %s in %s: one written from /dev/urandom and fsynced, copied to the other two, so every block is allocated in all three; read through the page cache\n' \
    "$size_mib" "$(df --output=fstype "$work" | tail -n 1 | tr -d ' ')" "$work"
  printf 'fio job\tioengine=nbd, numjobs=1 (one NBD connection), time_based, runtime=%ss, ramp_time=%ss, norandommap, fixed randseed, size=the pair'"'"'s data size rounded down to 1 MiB (the same offsets for every server)\n' "$runtime" "$ramp"
  printf 'rounds\t%s (server order rotated every row and round; one server running at a time)\n' "$rounds"
} >"$meta"

# Probe each server once: it starts, answers, and its export size; this also
# gives the pair's data size, which bounds fio's offsets for every server.
probe=""
for s in "${server_list[@]}"; do
  cell="$run_dir/cells/probe.$s"
  mkdir -p "$cell"
  if [ "$s" = serve ]; then
    start_serve "$cell" || exit 1
  else
    start_pair "$cell" "$s" || exit 1
  fi
  info=$(nbdinfo --json "$nbd_uri" 2>/dev/null |
    python3 -c 'import json,sys; e=json.load(sys.stdin)["exports"][0]; print(("yes" if e.get("can_multi_conn") else "no") + ", size " + str(e["export-size"]))' ||
    echo "nbdinfo failed")
  if [ "$s" = serve ]; then stop_serve; else stop_pair; fi
  probe="${probe:+$probe; }$s: multi-conn $info"
  log "probe $s: multi-conn $info"
done
[ -n "$data_size" ] || die "no pair was probed (no protocol?)"
fio_size=$(( data_size / 1048576 * 1048576 ))
printf 'exports\t%s; fio uses the first %s bytes (%s MiB)\n' "$probe" "$fio_size" "$((fio_size / 1048576))" >>"$meta"

# ---------------------------------------------------------------- run
cells="$run_dir/cells.tsv"
: >"$cells"
failed=0
n=${#server_list[@]}
total=$(( ${#rows[@]} * rounds * n ))
done_cells=0
eta=$(( total * (runtime + ramp + 4) ))
log "$total cells of ${runtime}s (+${ramp}s ramp); about $(( eta / 60 )) min $(( eta % 60 )) s"
for ((ri = 0; ri < ${#rows[@]}; ri++)); do
  IFS='|' read -r id label rw bs qd _kind <<<"${rows[ri]}"
  for ((round = 1; round <= rounds; round++)); do
    for ((k = 0; k < n; k++)); do
      s=${server_list[(k + ri + round - 1) % n]}
      done_cells=$((done_cells + 1))
      out="$id.$s.r$round.json"
      cell="$run_dir/cells/$id.$s.r$round"
      mkdir -p "$cell"
      if [ "$s" = serve ]; then
        files=("$img_serve")
        start_serve "$cell" || {
          printf '%s\t%s\t%s\t%s\t\t\t\t\t\n' "$id" "$round" "$s" "server did not start" >>"$cells"
          failed=1
          continue
        }
        pids=("$serve_pid")
      else
        files=("$img_alpha" "$img_beta")
        start_pair "$cell" "$s" || {
          printf '%s\t%s\t%s\t%s\t\t\t\t\t\n' "$id" "$round" "$s" "pair did not come up (logs: cells/${cell##*/})" >>"$cells"
          failed=1
          continue
        }
        pids=("${pair_pids[@]}")
      fi
      # Flush dirty pages from the previous cell (and the set-up) so that
      # their writeback is not charged to this cell, and pull the backing
      # files back into the page cache: memory reclaim (this VM runs DAMON's
      # proactive pageout) evicts them between cells.
      sync
      cat "${files[@]}" >/dev/null
      status=ok
      note=""
      if ! fio --name="$id" --ioengine=nbd --uri="$nbd_uri" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --size="$fio_size" \
        --time_based --runtime="$runtime" --ramp_time="$ramp" \
        --norandommap --randrepeat=1 --randseed=20251123 \
        --lat_percentiles=1 --percentile_list=50:99:99.9 \
        --output-format=json --output="$run_dir/$out" >"$run_dir/$out.stderr" 2>&1; then
        status="fio failed (see $out.stderr)"
      fi
      cpu=()
      for pid in "${pids[@]}"; do cpu+=("$(proc_cpu "$pid")"); done
      [ ${#cpu[@]} -ge 2 ] || cpu+=("")
      cached=""
      for f in "${files[@]}"; do cached="${cached:+$cached/}$(cached_pct "$f")"; done
      for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
          status="a daemon died during the cell (logs: cells/${cell##*/})"
        fi
      done
      if [ "$s" = serve ]; then
        stop_serve
      else
        if [ "$status" = ok ]; then
          IFS=$'\t' read -r verdict note < <(check_pair "$cell") || true
          [ "$verdict" = ok ] || status="pair not in sync after the cell: ${verdict#bad: } (logs: cells/${cell##*/})"
        fi
        warn=$(log_warnings "$cell")
        [ -z "$warn" ] || note="${note:+$note; }$warn"
        stop_pair
      fi
      [ -s "$run_dir/$out.stderr" ] || rm -f "$run_dir/$out.stderr"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$round" "$s" "$status" "$out" \
        "${cpu[0]}" "${cpu[1]}" "$cached" "$note" >>"$cells"
      if [ "$status" = ok ]; then
        summary=$(python3 - "$run_dir/$out" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = max((j["read"], j["write"]), key=lambda s: s["total_ios"])
p50 = side["lat_ns"]["percentile"].get("50.000000", 0) / 1000
print(f"{side['iops']:.0f} IOPS, {side['bw_bytes'] / 1e6:.1f} MB/s, p50 {p50:.1f} us")
EOF
        ) || summary="(unreadable JSON)"
      else
        summary=$status
        failed=1
      fi
      log "[$done_cells/$total] $label, round $round, $s: $summary; cached after the cell: $cached${note:+; note: $note}"
    done
  done
done
printf 'load average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$meta"

# ---------------------------------------------------------------- report
render_report "$run_dir" | tee "$report"
{
  echo
  echo "Report: ${report#"$repo"/}"
  echo "Raw fio JSON, daemon logs and configuration per cell: $run_dir"
} >&2
exit "$failed"
