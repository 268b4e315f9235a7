#!/usr/bin/env bash
# Replication benchmark harness: fio through NBD against the Primary of a
# two-node tandem pair with protocol A, B and C at several link round-trip
# times (a userspace delay proxy, tandem-netem, on the replication link),
# next to the baselines measured in the same run: fio directly on the backing
# file, `tandem serve` (no replication), nbdkit's file plugin and qemu-nbd.
# Also measures resync throughput at each RTT, and memory use and start-up
# time against device size. One server at a time, interleaved per row so that
# they are compared side by side. Plots (gnuplot, PNG) go next to the report.
#
#   benches/replication-bench.sh                 full run (10 s cells, 3 rounds)
#   benches/replication-bench.sh --quick         smoke run (under 2 minutes)
#   benches/replication-bench.sh --protocols C --rtts 0,5
#
# Options (each also settable through the environment variable shown):
#   --quick              1 s cells, no ramp, 1 round, 256 MiB, RTT 0 and 5 ms,
#                        protocols A and C, sizes 1 and 1024 GiB (unless set)
#   --protocols LIST     comma-separated subset of A,B,C   [BENCH_PROTOCOLS, A,B,C]
#   --rtts LIST          link round-trip times in ms, whole numbers
#                                                          [BENCH_RTTS, 0,1,5]
#   --baselines LIST     subset of file,serve,nbdkit,qemu-nbd, or "none"
#                                                          [BENCH_BASELINES, all four]
#                        (in the QD1 row, serve and file also run once per
#                        RTT above 0 with fio idle that long between writes)
#   --sizes LIST         device sizes in GiB for the memory and start-up rows
#                        (sparse files), or "none"         [BENCH_SIZES, 1,64,1024]
#   --no-resync          skip the resync rows
#   --rounds N           rounds per row; figures are medians  [BENCH_ROUNDS, 3]
#   --runtime S          measured seconds per cell             [BENCH_RUNTIME, 10]
#   --ramp S             unmeasured warm-up seconds per cell   [BENCH_RAMP, 2]
#   --size-mib N         size of each backing file in MiB      [BENCH_SIZE_MIB, 1024]
#   --rows LIST          comma-separated subset of the row ids: write-1m-seq,
#                        randwrite-4k-qd32, randwrite-4k-qd1    [BENCH_ROWS, all]
#   --work-dir DIR       backing files, raw fio JSON and logs  [BENCH_WORK_DIR, benches/work]
#   --results-dir DIR    where the report and plots go  [BENCH_RESULTS_DIR, benches/results]
#   --no-build           use the existing target/release/tandem and tandem-netem
#   --report RUN_DIR     only render the report (and plots) of an earlier run again
#
# The markdown report goes to stdout and to <results-dir>/replication-<date>.md
# (replication-<date>-quick.md for --quick), its plots to
# <results-dir>/replication-<date>-*.png; progress goes to stderr. The raw
# fio JSON, the daemons' logs and configuration (one directory per cell) and
# the inputs of the report stay in <work-dir>/runs/replication-<date>/.
# Exit status: 0 when every cell ran, 1 when a cell failed, 2 on bad usage.
# Backquotes in single-quoted strings below are markdown, not expansions.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
. benches/lib.sh
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
results_dir="${BENCH_RESULTS_DIR:-$repo/benches/results}"
rtts="${BENCH_RTTS:-}"
baselines="${BENCH_BASELINES:-}"
sizes="${BENCH_SIZES:-}"
resync=1
protocols_set="${BENCH_PROTOCOLS:+1}"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    --protocols) protocols="${2:?--protocols needs a list}"; protocols_set=1; shift ;;
    --protocols=*) protocols="${1#*=}"; protocols_set=1 ;;
    --rtts) rtts="${2:?--rtts needs a list}"; shift ;;
    --rtts=*) rtts="${1#*=}" ;;
    --baselines) baselines="${2:?--baselines needs a list}"; shift ;;
    --baselines=*) baselines="${1#*=}" ;;
    --sizes) sizes="${2:?--sizes needs a list}"; shift ;;
    --sizes=*) sizes="${1#*=}" ;;
    --no-resync) resync=0 ;;
    --results-dir) results_dir="${2:?--results-dir needs DIR}"; shift ;;
    --results-dir=*) results_dir="${1#*=}" ;;
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
  : "${rounds:=1}" "${runtime:=1}" "${ramp:=0}" "${size_mib:=256}" "${rtts:=0,5}" "${sizes:=1,1024}"
  [ -n "$protocols_set" ] || protocols=A,C
else
  : "${rounds:=3}" "${runtime:=10}" "${ramp:=2}" "${size_mib:=1024}" "${rtts:=0,1,5}" "${sizes:=1,64,1024}"
fi
: "${baselines:=file,serve,nbdkit,qemu-nbd}"
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
IFS=, read -r -a rtt_list <<<"$rtts"
[ ${#rtt_list[@]} -gt 0 ] || die "--rtts is empty"
for r in "${rtt_list[@]}"; do
  if ! [[ "$r" =~ ^[0-9]+$ ]] || [ "$r" -gt 1000 ]; then
    die "RTT '$r' is not a whole number of ms from 0 to 1000"
  fi
done
baseline_list=()
if [ "$baselines" != none ]; then
  IFS=, read -r -a baseline_list <<<"$baselines"
  for b in "${baseline_list[@]}"; do
    case "$b" in file|serve|nbdkit|qemu-nbd) ;; *) die "unknown baseline '$b' (file, serve, nbdkit, qemu-nbd)" ;; esac
  done
fi
size_list=()
if [ "$sizes" != none ]; then
  IFS=, read -r -a size_list <<<"$sizes"
  for g in "${size_list[@]}"; do
    if ! [[ "$g" =~ ^[1-9][0-9]*$ ]] || [ "$g" -gt 16384 ]; then
      die "size '$g' is not a whole number of GiB from 1 to 16384"
    fi
  done
fi
# The servers of a round: the baselines, then one pair per protocol and RTT
# (named like C@5ms).
server_list=("${baseline_list[@]}")
for r in "${rtt_list[@]}"; do
  for p in "${protocol_list[@]}"; do server_list+=("$p@${r}ms"); done
done
# For the QD1 row only: serve and the file again with fio idle for the RTT
# between writes (named like serve-idle5ms), which is how a pair at that RTT
# leaves the machine between a write's send and its ack. A wake-up from
# several idle milliseconds costs more on this VM than one from a busy loop
# (serve's QD1 p50 rose from 42 to 83 us with fio's thinktime at 5 ms), and
# protocol C's limit is built from these two baselines.
for r in "${rtt_list[@]}"; do
  [ "$r" -gt 0 ] || continue
  for b in serve file; do
    for x in "${baseline_list[@]}"; do
      [ "$x" = "$b" ] && server_list+=("$b-idle${r}ms")
    done
  done
done
servers=$(IFS=,; echo "${server_list[*]}")

# ---------------------------------------------------------------- report
# render_report RUN_DIR [PLOT_PREFIX]: the markdown report of a run directory
# on stdout; with PLOT_PREFIX, the plots as PLOT_PREFIX-*.png (gnuplot).
render_report() {
  PYTHONDONTWRITEBYTECODE=1 python3 "$repo/benches/harness_report.py" "$@"
}

if [ -n "$report_only" ]; then
  [ -f "$report_only/meta.tsv" ] || die "$report_only has no meta.tsv (not a run directory)"
  render_report "$report_only" "${report_only%/}/plot"
  exit 0
fi

# ---------------------------------------------------------------- tools
# The same Debian packages scripts/test.sh installs.
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
for b in "${baseline_list[@]}"; do
  case "$b" in
    nbdkit) command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit) ;;
    qemu-nbd) command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils) ;;
  esac
done
command -v gnuplot >/dev/null 2>&1 || missing+=(gnuplot-nox)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif [ "${missing[*]}" = gnuplot-nox ]; then
    log "no gnuplot: the report will have no plots (install gnuplot-nox)"
  else
    die "missing tools: install the Debian packages ${missing[*]}"
  fi
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the report"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (Debian's fio has it)"

tandem_bin="${CARGO_TARGET_DIR:-target}/release/tandem"
netem_bin="${CARGO_TARGET_DIR:-target}/release/tandem-netem"
if [ "$build" -eq 1 ]; then
  log "cargo build --release -p tandem -p tandem-netem"
  cargo build --release -p tandem -p tandem-netem >&2
fi
[ -x "$tandem_bin" ] || die "$tandem_bin not found (build it or drop --no-build)"
[ -x "$netem_bin" ] || die "$netem_bin not found (build it or drop --no-build)"
tandem_bin=$(cd "$(dirname "$tandem_bin")" && pwd)/tandem
netem_bin=$(cd "$(dirname "$netem_bin")" && pwd)/tandem-netem

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
pair_alpha=$img_alpha
pair_beta=$img_beta
mkdir -p "$results_dir"
results_dir=$(cd "$results_dir" && pwd)
report="$results_dir/replication-$stamp$suffix.md"
img_scale_alpha="$work/replication-scale-alpha.img"
img_scale_beta="$work/replication-scale-beta.img"

# ---------------------------------------------------------------- servers
serve_pid=""     # the running baseline server (`tandem serve`, nbdkit, qemu-nbd), if any
serve_name=""    # its name
proxy_pids=()    # the running tandem-netem proxies, if any
pair_dir=""      # the cell directory of the running pair, if any
pair_pids=()     # daemon pids of the running pair (alpha, beta), started here
nbd_uri=""       # where fio connects for the current cell
pair_nbd=""      # alpha's NBD port in the current pair
data_size=""     # the pair's replicated size (dump-md data-size)

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
  stop_serve
  stop_pair
  rm -f "$img_serve" "$img_alpha" "$img_beta" "$img_scale_alpha" "$img_scale_beta"
  [ -z "${sock_root:-}" ] || rm -rf "$sock_root"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

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

# start_serve CELL_DIR NAME: baseline server NAME (serve, nbdkit or qemu-nbd)
# on the baseline file; sets nbd_uri.
start_serve() {
  local cell=$1 name=$2 port
  port=$(free_port)
  echo "=== $(date +%T) $name on port $port" >>"$cell/serve.log"
  local server=$name
  [ "$name" = serve ] && server=tandem
  launch_nbd_server "$server" "$tandem_bin" "$img_serve" "$port" "$cell/serve.log"
  serve_pid=$!
  serve_name=$name
  nbd_uri="nbd://127.0.0.1:$port"
  if ! wait_nbd "$nbd_uri"; then
    tail -5 "$cell/serve.log" >&2
    log "$name did not answer on port $port within 10 s (log: $cell/serve.log)"
    stop_serve
    return 1
  fi
}

stop_serve() {
  [ -n "$serve_pid" ] || return 0
  local pid=$serve_pid i
  serve_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  if [ "$serve_name" = serve ]; then
    stop_pid "$pid" "tandem serve"
    return
  fi
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  # Our child still (we have not waited for it): the pid cannot be reused.
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

# The daemons' run directories (control sockets, pid files) live under a
# short path of their own: a Unix socket path must fit in 108 bytes, which
# the cell directories (under the work dir, wherever it is) need not.
sock_root=$(mktemp -d /tmp/tandem-bench.XXXXXX)
pair_run=""
pair_runs=0
new_pair_run() {
  pair_runs=$((pair_runs + 1))
  pair_run="$sock_root/$pair_runs"
  mkdir -p "$pair_run/alpha" "$pair_run/beta"
}

# tcli CELL NODE ARGS...: a tandem verb on NODE of the pair in CELL, at most
# 60 s, its output on stdout and its errors in CELL/cli.log. Each node has
# its own configuration directory: with a delayed link, each one reaches its
# peer through a proxy.
tcli() {
  local cell=$1 node=$2
  shift 2
  timeout 60 "$tandem_bin" --config-dir "$cell/etc-$node" --node "$node" --run-dir "$pair_run/$node" \
    "$@" 2>>"$cell/cli.log"
}

# start_proxy CELL NAME LISTEN_PORT TARGET_PORT DELAY_US: a tandem-netem on
# 127.0.0.1:LISTEN_PORT forwarding to TARGET_PORT with DELAY_US one way in
# each direction; waits until it listens.
start_proxy() {
  local cell=$1 name=$2 i
  "$netem_bin" --listen "127.0.0.1:$3" --connect "127.0.0.1:$4" --delay "${5}us" \
    --buffer 64MiB >"$cell/$name.log" 2>&1 &
  proxy_pids+=("$!")
  for ((i = 0; i < 100; i++)); do
    grep -q "^listening on" "$cell/$name.log" 2>/dev/null && return 0
    kill -0 "${proxy_pids[-1]}" 2>/dev/null || break
    sleep 0.05
  done
  log "the proxy $name did not start (log: $cell/$name.log)"
  return 1
}

stop_proxies() {
  local pid
  for pid in "${proxy_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${proxy_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  proxy_pids=()
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

# write_config CELL NODE PROTOCOL EXTRA ALPHA_ADDR BETA_ADDR ALPHA_NBD BETA_NBD:
# NODE's view of the resource: the peer's address is where NODE reaches it
# (a proxy when the link is delayed).
write_config() {
  local cell=$1 node=$2
  mkdir -p "$cell/etc-$node"
  cat >"$cell/etc-$node/r0.toml" <<TOML
protocol = "$3"
$4
[net]
shared-secret = "replication-bench"
connect-int = "1s"

[[node]]
name = "alpha"
address = "$5"
disk = "$pair_alpha"
meta-disk = "internal"
nbd = "$7"

[[node]]
name = "beta"
address = "$6"
disk = "$pair_beta"
meta-disk = "internal"
nbd = "$8"
TOML
}

# start_pair CELL_DIR PROTOCOL RTT_MS [EXTRA_TOML]: a fresh pair on loopback,
# as an operator sets one up (tests/common/pair.rs): configuration, create-md
# on both nodes, the daemons, Connected, new-current-uuid --clear-bitmap,
# UpToDate/UpToDate, alpha Primary and exporting r0 over NBD. With RTT_MS > 0
# each node reaches the other through its own tandem-netem proxy delaying
# each direction by half the RTT, so every link packet crosses one proxy.
# Backing files: $pair_alpha and $pair_beta. Sets nbd_uri and data_size.
start_pair() {
  local cell=$1 proto=$2 rtt=$3 extra=${4:-} ports=() p node ds a_addr b_addr
  new_pair_run
  while [ ${#ports[@]} -lt 6 ]; do
    p=$(free_port)
    [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
  done
  pair_nbd=${ports[2]}
  a_addr="127.0.0.1:${ports[0]}"
  b_addr="127.0.0.1:${ports[1]}"
  pair_dir=$cell
  if [ "$rtt" -gt 0 ]; then
    if ! start_proxy "$cell" proxy-to-alpha "${ports[4]}" "${ports[0]}" $((rtt * 500)) ||
      ! start_proxy "$cell" proxy-to-beta "${ports[5]}" "${ports[1]}" $((rtt * 500)); then
      stop_pair
      return 1
    fi
    # Defaults for everything else (net.timeout 6s, ping-int 10s, al-extents
    # 1237); connect-int 1s so that the nodes find each other quickly.
    write_config "$cell" alpha "$proto" "$extra" "$a_addr" "127.0.0.1:${ports[5]}" \
      "127.0.0.1:${ports[2]}" "127.0.0.1:${ports[3]}"
    write_config "$cell" beta "$proto" "$extra" "127.0.0.1:${ports[4]}" "$b_addr" \
      "127.0.0.1:${ports[2]}" "127.0.0.1:${ports[3]}"
  else
    for node in alpha beta; do
      write_config "$cell" "$node" "$proto" "$extra" "$a_addr" "$b_addr" \
        "127.0.0.1:${ports[2]}" "127.0.0.1:${ports[3]}"
    done
  fi
  for node in alpha beta; do
    # --force: the file holds the previous cell's metadata (or random data).
    if ! tcli "$cell" "$node" create-md r0 --force >>"$cell/cli.log"; then
      log "create-md on $node failed: $(tail -1 "$cell/cli.log")"
      stop_pair
      return 1
    fi
  done
  ds=$(tcli "$cell" alpha dump-md r0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data-size"])') || {
    log "dump-md on alpha failed: $(tail -1 "$cell/cli.log")"
    stop_pair
    return 1
  }
  data_size=$ds
  # `tandem run` is the process `tandem up` starts; run here so that this
  # script is its parent and knows its pid without trusting a pid file.
  for node in alpha beta; do
    "$tandem_bin" --config-dir "$cell/etc-$node" --node "$node" --run-dir "$pair_run/$node" \
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
  if [ -z "$pair_dir" ]; then
    stop_proxies
    return 0
  fi
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
  stop_proxies
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
rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$repo" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev="$rev+dirty"
cmdline="benches/replication-bench.sh --protocols $protocols --rtts $rtts --baselines $baselines --sizes $sizes --rounds $rounds --runtime $runtime --ramp $ramp --size-mib $size_mib${only_rows:+ --rows $only_rows}"
[ "$resync" -eq 1 ] || cmdline="$cmdline --no-resync"
{
  printf 'date\t%s\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')"
  printf 'servers\t%s\n' "$servers"
  printf 'rtts\t%s\n' "$rtts"
  printf 'command\t`%s`\n' "$cmdline"
  printf 'machine\t%s CPUs (%s), %s, kernel %s\n' "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'load average at start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'fio\t%s\n' "$(first_line fio --version)"
  printf 'libnbd\t%s\n' "$(nbdinfo --version 2>&1 | tail -n 1)"
  printf 'tandem\t%s (git %s)\n' "$(first_line "$tandem_bin" --version)" "$rev"
  for b in "${baseline_list[@]}"; do
    case "$b" in
      file) printf 'file\tfio directly on the backing file: ioengine=psync at QD1, io_uring otherwise (buffered, like the servers)\n' ;;
      serve) printf 'serve\t`tandem serve FILE --listen 127.0.0.1:PORT` (no replication)\n' ;;
      nbdkit) printf 'nbdkit\t%s, `nbdkit -f -p PORT -i 127.0.0.1 file FILE`\n' "$(first_line nbdkit --version)" ;;
      qemu-nbd) printf 'qemu-nbd\t%s, `qemu-nbd -f raw -t --cache=writeback --aio=threads FILE`\n' "$(first_line qemu-nbd --version)" ;;
    esac
  done
  printf 'pair\ttwo nodes on this machine, each `tandem --config-dir D --node NODE --run-dir R/NODE run r0` (the daemon `up` starts) on its own backing file with internal metadata; replication link and NBD on 127.0.0.1; fio writes to alpha'"'"'s export r0\n'
  printf 'link delay\tRTT 0: the nodes connect directly; RTT R ms: each node reaches its peer through its own `tandem-netem --delay R/2 --buffer 64MiB`, so each direction of the link is delayed by R/2\n'
  printf 'pair set-up per cell\t`create-md r0 --force` on both, start both, wait Connected, `new-current-uuid r0 --clear-bitmap`, wait UpToDate/UpToDate, `primary r0` on alpha; afterwards `down r0 --force` on both\n'
  printf 'pair configuration\t`protocol` (A, B or C), `net.shared-secret`, `net.connect-int = "1s"`; every other key at its default\n'
  printf 'backing files\t3 × %s MiB (serve, alpha, beta) on %s in %s: one written from /dev/urandom and fsynced, copied to the other two, so every block is allocated in all three; each cell starts with the files written back and dropped from the page cache (the rows write whole 4 KiB blocks, so nothing is read from the disk), and writes go through the page cache\n' \
    "$size_mib" "$(df --output=fstype "$work" | tail -n 1 | tr -d ' ')" "$work"
  printf 'fio job\tioengine=nbd, numjobs=1 (one NBD connection), time_based, runtime=%ss, ramp_time=%ss, norandommap, fixed randseed, size=the pair'"'"'s data size rounded down to 1 MiB (the same offsets for every server)\n' "$runtime" "$ramp"
  printf 'rounds\t%s (server order rotated every row and round; one server running at a time)\n' "$rounds"
} >"$meta"

# The link's actual round trip at each RTT setting: a 4 KiB message and a
# 16-byte answer (a data frame and its ack) through a tandem-netem with the
# same delay (or direct at RTT 0), median of 200. The limits in the report
# use these, so the proxy's own overshoot is not charged to tandem. Probed
# once per RTT here and again before each QD1 pair cell at that RTT (the
# proxy's overshoot drifts with the machine by tens of microseconds, as
# much as the limit's margin); the report takes the median of them all.
# probe_rtt MS [ROUND]: one probe, appended to rtt.tsv.
probe_rtt() {
  local r=$1 m
  m=$(python3 - "$netem_bin" "$r" <<'EOF'
import socket, statistics, subprocess, sys, threading, time
netem, rtt_ms = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
def echo():
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    need = 0
    while True:
        d = c.recv(65536)
        if not d:
            return
        need += len(d)
        while need >= 4096:
            need -= 4096
            c.sendall(b"a" * 16)
threading.Thread(target=echo, daemon=True).start()
proxy = None
addr = srv.getsockname()
if rtt_ms > 0:
    proxy = subprocess.Popen([netem, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{addr[1]}",
                              "--delay", f"{rtt_ms * 500}us"], stdout=subprocess.PIPE, text=True)
    host, port = proxy.stdout.readline().split()[-1].rsplit(":", 1)
    addr = (host, int(port))
try:
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        s.sendall(b"d" * 4096)
        got = 0
        while got < 16:
            got += len(s.recv(16 - got))
        times.append((time.perf_counter() - t) * 1e6)
    print(f"{statistics.median(times):.0f}")
finally:
    if proxy:
        proxy.terminate()
        proxy.wait()
EOF
  ) || m=""
  printf '%s\t%s\t%s\n' "$r" "$m" "${2:-}" >>"$run_dir/rtt.tsv"
  log "link RTT setting $r ms: measured ${m:-?} us${2:+ (round $2)}"
}
: >"$run_dir/rtt.tsv"
for r in "${rtt_list[@]}"; do
  probe_rtt "$r"
done

# The pair's data size bounds fio's offsets for every server: probe one pair.
probe_cell="$run_dir/cells/probe"
mkdir -p "$probe_cell"
start_pair "$probe_cell" "${protocol_list[0]}" 0 || exit 1
stop_pair
fio_size=$(( data_size / 1048576 * 1048576 ))
printf 'fio size\t%s bytes (%s MiB)\n' "$fio_size" "$((fio_size / 1048576))" >>"$meta"

# ---------------------------------------------------------------- run
cells="$run_dir/cells.tsv"
: >"$cells"
failed=0
n=${#server_list[@]}
n_idle=0
for s in "${server_list[@]}"; do [[ "$s" == *-idle*ms ]] && n_idle=$((n_idle + 1)); done
total=0
for r in "${rows[@]}"; do
  IFS='|' read -r _id _label _rw _bs qd _kind <<<"$r"
  if [ "$qd" -eq 1 ]; then total=$((total + rounds * n)); else total=$((total + rounds * (n - n_idle))); fi
done
done_cells=0
eta=$(( total * (runtime + ramp + 3) ))
log "$total cells of ${runtime}s (+${ramp}s ramp); about $(( eta / 60 )) min $(( eta % 60 )) s, then resync and size rows"
for ((ri = 0; ri < ${#rows[@]}; ri++)); do
  IFS='|' read -r id label rw bs qd _kind <<<"${rows[ri]}"
  for ((round = 1; round <= rounds; round++)); do
    for ((k = 0; k < n; k++)); do
      s=${server_list[(k + ri + round - 1) % n]}
      base=$s
      think=()
      if [[ "$s" == *-idle*ms ]]; then
        [ "$qd" -eq 1 ] || continue
        base=${s%-idle*}
        idle=${s##*-idle}
        think=(--thinktime=$(( ${idle%ms} * 1000 )))
      fi
      done_cells=$((done_cells + 1))
      out="$id.$s.r$round.json"
      cell="$run_dir/cells/$id.$s.r$round"
      mkdir -p "$cell"
      target=(--ioengine=nbd --uri="PLACEHOLDER")
      pids=()
      case "$base" in
        file)
          files=("$img_serve")
          engine=io_uring
          [ "$qd" -eq 1 ] && engine=psync
          target=(--ioengine="$engine" --filename="$img_serve")
          ;;
        serve|nbdkit|qemu-nbd)
          files=("$img_serve")
          start_serve "$cell" "$base" || {
            printf '%s\t%s\t%s\t%s\t\t\t\t\t\n' "$id" "$round" "$s" "server did not start" >>"$cells"
            failed=1
            continue
          }
          pids=("$serve_pid")
          target=(--ioengine=nbd --uri="$nbd_uri")
          ;;
        *)
          files=("$img_alpha" "$img_beta")
          rtt=${s#*@}
          if [ "$qd" -eq 1 ] && [ "${rtt%ms}" -gt 0 ]; then
            probe_rtt "${rtt%ms}" "$round"
          fi
          start_pair "$cell" "${s%@*}" "${rtt%ms}" || {
            printf '%s\t%s\t%s\t%s\t\t\t\t\t\n' "$id" "$round" "$s" "pair did not come up (logs: cells/${cell##*/})" >>"$cells"
            failed=1
            continue
          }
          pids=("${pair_pids[@]}")
          target=(--ioengine=nbd --uri="$nbd_uri")
          ;;
      esac
      # Flush dirty pages from the previous cell (and the set-up) so that
      # their writeback is not charged to this cell, and start every cell
      # with the backing files out of the page cache (see evict_cache; the
      # rows only write whole blocks, so nothing is read from the disk).
      sync
      evict_cache "${files[@]}"
      status=ok
      note=""
      # At QD1 fio logs every I/O's latency: its percentiles come from a
      # histogram whose buckets are 1/64 of a power of two wide (64 us
      # around 5 ms, as wide as the margin the protocol C target allows),
      # so exact_latency replaces them with the log's own percentiles.
      lat_log=()
      [ "$qd" -eq 1 ] && lat_log=(--write_lat_log="$run_dir/${out%.json}" --log_avg_msec=0)
      if ! fio --name="$id" "${target[@]}" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --size="$fio_size" \
        --time_based --runtime="$runtime" --ramp_time="$ramp" \
        --norandommap --randrepeat=1 --randseed=20251123 \
        --lat_percentiles=1 --percentile_list=50:99:99.9 \
        "${lat_log[@]}" "${think[@]}" \
        --output-format=json --output="$run_dir/$out" >"$run_dir/$out.stderr" 2>&1; then
        status="fio failed (see $out.stderr)"
      fi
      if [ ${#lat_log[@]} -gt 0 ]; then
        exact_latency "$run_dir/${out%.json}" "$run_dir/$out" || status="per-I/O latency log unreadable (see $out.stderr)"
      fi
      cpu=()
      for pid in "${pids[@]}"; do cpu+=("$(proc_cpu "$pid")"); done
      while [ ${#cpu[@]} -lt 2 ]; do cpu+=(""); done
      cached=""
      for f in "${files[@]}"; do cached="${cached:+$cached/}$(cached_pct "$f" $((size_mib * 1048576)))"; done
      for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
          status="a server or daemon died during the cell (logs: cells/${cell##*/})"
        fi
      done
      case "$base" in
        file) ;;
        serve|nbdkit|qemu-nbd) stop_serve ;;
        *)
          if [ "$status" = ok ]; then
            IFS=$'\t' read -r verdict note < <(check_pair "$cell") || true
            [ "$verdict" = ok ] || status="pair not in sync after the cell: ${verdict#bad: } (logs: cells/${cell##*/})"
          fi
          warn=$(log_warnings "$cell")
          [ -z "$warn" ] || note="${note:+$note; }$warn"
          stop_pair
          ;;
      esac
      [ -s "$run_dir/$out.stderr" ] || rm -f "$run_dir/$out.stderr"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$round" "$s" "$status" "$out" \
        "${cpu[0]}" "${cpu[1]}" "$cached" "$note" >>"$cells"
      if [ "$status" = ok ]; then
        summary=$(PYTHONDONTWRITEBYTECODE=1 python3 - "$repo/benches" "$run_dir/$out" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from fio_report import fio_numbers
n = fio_numbers(sys.argv[2])
print(f"{n['iops']:.0f} IOPS, {n['mbps']:.1f} MB/s, p50 {n['p50'] or 0:.1f} us")
EOF
        ) || summary="(unreadable fio output)"
      else
        summary=$status
        failed=1
      fi
      log "[$done_cells/$total] $label, round $round, $s: $summary; cached after the cell: $cached${note:+; note: $note}"
    done
  done
done

# ---------------------------------------------------------------- resync
# At each RTT: a protocol C pair, `invalidate-remote` on alpha, and the time
# until beta is UpToDate again: the whole device crosses the delayed link.
# resync-rate is set far above what the disks sustain (unthrottled); with no
# client I/O the dynamic controller does not slow it down.
now_ns() { date +%s%N; }
# wait_log_count FILE PATTERN N: poll until FILE has N lines with PATTERN
# (10 ms steps, 120 s).
wait_log_count() {
  local i
  for ((i = 0; i < 12000; i++)); do
    [ "$(grep -c "$2" "$1" || true)" -ge "$3" ] && return 0
    sleep 0.01
  done
  log "$1: fewer than $3 lines with '$2' after 120 s"
  return 1
}
: >"$run_dir/resync.tsv"
if [ "$resync" -eq 1 ]; then
  for r in "${rtt_list[@]}"; do
    cell="$run_dir/cells/resync.${r}ms"
    mkdir -p "$cell"
    status=ok
    secs=""
    if start_pair "$cell" C "$r" $'[disk]\nresync-rate = "4GiB"\n'; then
      sync
      cat "$img_alpha" "$img_beta" >/dev/null
      before=$(grep -c "resync finished" "$cell/beta.log" || true)
      t0=$(now_ns)
      # beta's dstate still reads UpToDate/UpToDate until alpha's SyncStart
      # arrives, half a round trip later: wait for beta's own line.
      if tcli "$cell" alpha invalidate-remote r0 >>"$cell/cli.log" &&
        wait_log_count "$cell/beta.log" "resync finished" $((before + 1)) &&
        wait_state "$cell" beta dstate UpToDate/UpToDate; then
        t1=$(now_ns)
        secs=$(python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}')")
        tcli "$cell" beta status r0 --json >"$cell/status.beta.json" || true
      else
        status="the resync did not finish (logs: cells/${cell##*/})"
        failed=1
      fi
      stop_pair
    else
      status="pair did not come up (logs: cells/${cell##*/})"
      failed=1
    fi
    printf '%s\t%s\t%s\t%s\n' "$r" "$data_size" "$secs" "$status" >>"$run_dir/resync.tsv"
    log "resync at RTT $r ms: ${secs:-—} s for $data_size bytes ($status)"
  done
fi

# ---------------------------------------------------------------- sizes
# Memory use and start-up time against device size, on sparse backing files
# (protocol C, RTT 0): create-md; the daemon's start-up (spawn to `dstate`
# answering with the disk attached); the Primary's resident memory once the
# pair is up, and its peak after writes spread over the whole device.
: >"$run_dir/sizes.tsv"
vm_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null; }
for g in "${size_list[@]}"; do
  cell="$run_dir/cells/size.${g}GiB"
  mkdir -p "$cell"
  rm -f "$img_scale_alpha" "$img_scale_beta"
  truncate -s "${g}G" "$img_scale_alpha" "$img_scale_beta"
  pair_alpha=$img_scale_alpha
  pair_beta=$img_scale_beta
  status=ok
  row=""
  # Configuration and metadata as start_pair makes them, timed here step by step.
  ports=()
  while [ ${#ports[@]} -lt 4 ]; do
    p=$(free_port)
    [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
  done
  new_pair_run
  for node in alpha beta; do
    write_config "$cell" "$node" C "" "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" \
      "127.0.0.1:${ports[2]}" "127.0.0.1:${ports[3]}"
  done
  pair_dir=$cell
  t0=$(now_ns)
  if tcli "$cell" alpha create-md r0 --force >>"$cell/cli.log" &&
    t1=$(now_ns) && tcli "$cell" beta create-md r0 --force >>"$cell/cli.log"; then
    "$tandem_bin" --config-dir "$cell/etc-alpha" --node alpha --run-dir "$pair_run/alpha" \
      run r0 >>"$cell/alpha.log" 2>&1 &
    pair_pids+=("$!")
    t2=$(now_ns)
    for ((i = 0; i < 3000; i++)); do
      st=$(timeout 10 "$tandem_bin" --config-dir "$cell/etc-alpha" --node alpha --run-dir "$pair_run/alpha" \
        dstate r0 2>/dev/null) && [ -n "$st" ] && [ "${st%%/*}" != Diskless ] && break
      sleep 0.01
    done
    t3=$(now_ns)
    "$tandem_bin" --config-dir "$cell/etc-beta" --node beta --run-dir "$pair_run/beta" \
      run r0 >>"$cell/beta.log" 2>&1 &
    pair_pids+=("$!")
    apid=${pair_pids[0]}
    if wait_state "$cell" alpha cstate Connected &&
      tcli "$cell" alpha new-current-uuid r0 --clear-bitmap >>"$cell/cli.log" &&
      wait_state "$cell" beta dstate UpToDate/UpToDate &&
      tcli "$cell" alpha primary r0 >>"$cell/cli.log" &&
      wait_nbd "nbd://127.0.0.1:${ports[2]}/r0"; then
      rss_up=$(vm_kib "$apid" VmRSS)
      if ! fio --name=spread --ioengine=nbd --uri="nbd://127.0.0.1:${ports[2]}/r0" \
        --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 --time_based --runtime="$((runtime > 5 ? 5 : runtime))" \
        --norandommap --randrepeat=1 --randseed=20251123 \
        --output-format=json --output="$cell/fio.json" >"$cell/fio.stderr" 2>&1; then
        status="fio failed (logs: cells/${cell##*/})"
        failed=1
      fi
      rss_after=$(vm_kib "$apid" VmRSS)
      hwm=$(vm_kib "$apid" VmHWM)
      row=$(python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}\t{($t3 - $t2) / 1e9:.3f}')")$'\t'"$rss_up"$'\t'"$rss_after"$'\t'"$hwm"
    else
      status="pair did not come up (logs: cells/${cell##*/})"
      failed=1
    fi
  else
    status="create-md failed (logs: cells/${cell##*/})"
    failed=1
  fi
  stop_pair
  rm -f "$img_scale_alpha" "$img_scale_beta"
  [ -n "$row" ] || row=$'\t\t\t\t'
  printf '%s\t%s\t%s\n' "$g" "$row" "$status" >>"$run_dir/sizes.tsv"
  log "size $g GiB: create-md s, start-up s, RSS KiB up / after writes / peak: ${row//$'\t'/ } ($status)"
done
pair_alpha=$img_alpha
pair_beta=$img_beta
printf 'load average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$meta"

# ---------------------------------------------------------------- report
render_report "$run_dir" "${report%.md}" | tee "$report"
{
  echo
  echo "Report: $report"
  echo "Raw fio JSON, daemon logs and configuration per cell: $run_dir"
} >&2
exit "$failed"
