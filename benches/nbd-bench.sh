#!/usr/bin/env bash
# NBD benchmark: fio through NBD against `tandem serve`, `nbdkit file` and
# `qemu-nbd`, all serving the same backing file in the same run, one server at
# a time, interleaved per row so that they are compared side by side.
#
#   benches/nbd-bench.sh                 full run (10 s cells, 3 rounds)
#   benches/nbd-bench.sh --quick         smoke run (2 s cells, 1 round)
#   benches/nbd-bench.sh --servers nbdkit,qemu-nbd
#
# Options (each also settable through the environment variable shown):
#   --quick              2 s cells, 1 s ramp, 1 round (unless set otherwise)
#   --servers LIST       comma-separated subset of tandem,nbdkit,qemu-nbd
#                        [BENCH_SERVERS, default all three]
#   --rounds N           rounds per row; figures are medians  [BENCH_ROUNDS, 3]
#   --runtime S          measured seconds per cell             [BENCH_RUNTIME, 10]
#   --ramp S             unmeasured warm-up seconds per cell   [BENCH_RAMP, 2]
#   --size-mib N         backing file size in MiB              [BENCH_SIZE_MIB, 1024]
#   --seq-qd N           queue depth of the 1 MiB rows         [BENCH_SEQ_QD, 8]
#   --rows LIST          comma-separated subset of the row ids: randwrite-4k-qd1,
#                        randwrite-4k-qd32, randread-4k-qd1, randread-4k-qd32,
#                        write-1m-seq, read-1m-seq             [BENCH_ROWS, all]
#   --work-dir DIR       backing file, raw fio JSON and logs   [BENCH_WORK_DIR, benches/work]
#   --no-build           use the existing target/release/tandem
#
# The markdown report goes to stdout and to benches/results/nbd-<date>.md
# (nbd-<date>-quick.md for --quick); progress goes to stderr. The raw fio JSON,
# server logs and the inputs of the report stay in <work-dir>/runs/<date>/;
# `benches/fio_report.py <that dir>` renders the report again.
# Exit status: 0 when every cell ran, 1 when a cell failed, 2 on bad usage.
# Backquotes in single-quoted strings below are markdown, not expansions.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
. benches/lib.sh
repo=$PWD

usage() { sed -n '2,/^# Exit status/p' "$0" | sed -e 's/^# \{0,1\}//'; }
die() { echo "nbd-bench: $*" >&2; exit 2; }
log() { echo "[nbd-bench $(date +%H:%M:%S)] $*" >&2; }

quick=0
build=1
servers="${BENCH_SERVERS:-tandem,nbdkit,qemu-nbd}"
rounds="${BENCH_ROUNDS:-}"
runtime="${BENCH_RUNTIME:-}"
ramp="${BENCH_RAMP:-}"
size_mib="${BENCH_SIZE_MIB:-1024}"
seq_qd="${BENCH_SEQ_QD:-8}"
only_rows="${BENCH_ROWS:-}"
work="${BENCH_WORK_DIR:-benches/work}"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    --servers) servers="${2:?--servers needs a list}"; shift ;;
    --servers=*) servers="${1#*=}" ;;
    --rounds) rounds="${2:?--rounds needs N}"; shift ;;
    --rounds=*) rounds="${1#*=}" ;;
    --runtime) runtime="${2:?--runtime needs S}"; shift ;;
    --runtime=*) runtime="${1#*=}" ;;
    --ramp) ramp="${2:?--ramp needs S}"; shift ;;
    --ramp=*) ramp="${1#*=}" ;;
    --size-mib) size_mib="${2:?--size-mib needs N}"; shift ;;
    --size-mib=*) size_mib="${1#*=}" ;;
    --seq-qd) seq_qd="${2:?--seq-qd needs N}"; shift ;;
    --seq-qd=*) seq_qd="${1#*=}" ;;
    --rows) only_rows="${2:?--rows needs a list}"; shift ;;
    --rows=*) only_rows="${1#*=}" ;;
    --work-dir) work="${2:?--work-dir needs DIR}"; shift ;;
    --work-dir=*) work="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
if [ "$quick" -eq 1 ]; then
  : "${rounds:=1}" "${runtime:=2}" "${ramp:=1}"
else
  : "${rounds:=3}" "${runtime:=10}" "${ramp:=2}"
fi
for n in rounds runtime size_mib seq_qd; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, not '${!n}'"
done
[[ "$ramp" =~ ^[0-9]+$ ]] || die "ramp must be a whole number of seconds, not '$ramp'"

IFS=, read -r -a server_list <<<"$servers"
[ ${#server_list[@]} -gt 0 ] || die "--servers is empty"
for s in "${server_list[@]}"; do
  case "$s" in tandem|nbdkit|qemu-nbd) ;; *) die "unknown server '$s' (tandem, nbdkit, qemu-nbd)" ;; esac
done
has_server() { [[ ",$servers," == *",$1,"* ]]; }

# ---------------------------------------------------------------- tools
# The same Debian packages scripts/test.sh installs; qemu-utils only when
# qemu-nbd is missing, so a newer preinstalled build is never downgraded.
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
has_server nbdkit && { command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit); }
has_server qemu-nbd && { command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils); }
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
if has_server tandem; then
  if [ "$build" -eq 1 ]; then
    log "cargo build --release -p tandem"
    cargo build --release -p tandem >&2
  fi
  [ -x "$tandem_bin" ] || die "$tandem_bin not found (build it or drop --no-build)"
  tandem_bin=$(cd "$(dirname "$tandem_bin")" && pwd)/tandem
fi

# ---------------------------------------------------------------- work dir
stamp=$(date +%Y-%m-%d-%H%M%S)
mkdir -p "$work"
work=$(cd "$work" && pwd)
suffix=""
[ "$quick" -eq 1 ] && suffix="-quick"
run_dir="$work/runs/$stamp$suffix"
mkdir -p "$run_dir"
img="$work/disk.img"
results_dir="$repo/benches/results"
mkdir -p "$results_dir"
report="$results_dir/nbd-$stamp$suffix.md"

# ---------------------------------------------------------------- servers
current_pid=""   # the one server running, if any
current_name=""

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
  if [ -n "$current_pid" ]; then
    stop_server
  fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# start_server NAME PORT: start NAME on 127.0.0.1:PORT serving $img, wait
# until it answers an NBD handshake. Sets current_pid.
start_server() {
  local name=$1 port=$2 slog="$run_dir/$1.log"
  echo "=== $(date +%T) start on port $port" >>"$slog"
  launch_nbd_server "$name" "$tandem_bin" "$img" "$port" "$slog"
  current_pid=$!
  current_name=$name
  local i
  for ((i = 0; i < 200; i++)); do
    if ! kill -0 "$current_pid" 2>/dev/null; then
      wait "$current_pid" 2>/dev/null || true
      current_pid=""
      tail -5 "$slog" >&2
      log "$name exited before it was ready (log: $slog)"
      return 1
    fi
    if nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.05
  done
  log "$name did not answer on port $port within 10 s (log: $slog)"
  stop_server
  return 1
}

# CPU seconds (user+system) the running server has used so far.
server_cpu() { proc_cpu "$current_pid"; }

stop_server() {
  [ -n "$current_pid" ] || return 0
  local pid=$current_pid i
  current_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$current_name (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- rows
# id | label | fio rw | bs | iodepth | report kind
rows=(
  "randwrite-4k-qd1|4 KiB random write, QD1|randwrite|4k|1|iops+lat"
  "randwrite-4k-qd32|4 KiB random write, QD32|randwrite|4k|32|iops"
  "randread-4k-qd1|4 KiB random read, QD1|randread|4k|1|iops+lat"
  "randread-4k-qd32|4 KiB random read, QD32|randread|4k|32|iops"
  "write-1m-seq|1 MiB sequential write, QD$seq_qd|write|1m|$seq_qd|bw"
  "read-1m-seq|1 MiB sequential read, QD$seq_qd|read|1m|$seq_qd|bw"
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

# ---------------------------------------------------------------- backing file
log "writing the ${size_mib} MiB backing file $img (random data, fsynced)"
rm -f "$img"
# Random data, written once: every block is allocated and in the page cache,
# the same for all servers, and nothing can be served as a hole.
dd if=/dev/urandom of="$img" bs=1M count="$size_mib" conv=fsync status=none

# ---------------------------------------------------------------- metadata
meta="$run_dir/meta.tsv"
{
  printf 'date\t%s\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')"
  printf 'servers\t%s\n' "$servers"
  printf 'command\t`%s`\n' "benches/nbd-bench.sh --servers $servers --rounds $rounds --runtime $runtime --ramp $ramp --size-mib $size_mib --seq-qd $seq_qd${only_rows:+ --rows $only_rows}"
  printf 'machine\t%s CPUs (%s), %s, kernel %s\n' "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'load average at start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'fio\t%s\n' "$(first_line fio --version)"
  printf 'libnbd\t%s\n' "$(nbdinfo --version 2>&1 | tail -n 1)"
  if has_server tandem; then
    rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
    git -C "$repo" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev="$rev+dirty"
    printf 'tandem\t%s (git %s), `tandem serve FILE --listen 127.0.0.1:PORT`\n' "$(first_line "$tandem_bin" --version)" "$rev"
  fi
  has_server nbdkit && printf 'nbdkit\t%s, `nbdkit -f --exit-with-parent -p PORT -i 127.0.0.1 file FILE`\n' "$(first_line nbdkit --version)"
  has_server qemu-nbd && printf 'qemu-nbd\t%s, `qemu-nbd -f raw -t -p PORT -b 127.0.0.1 --cache=writeback --aio=threads FILE`\n' "$(first_line qemu-nbd --version)"
  printf 'backing file\t%s MiB of random data on %s (%s), served through the page cache by every server\n' \
    "$size_mib" "$(df --output=fstype "$work" | tail -n 1 | tr -d ' ')" "$img"
  printf 'fio job\tioengine=nbd, numjobs=1 (one NBD connection), time_based, runtime=%ss, ramp_time=%ss, norandommap, fixed randseed\n' "$runtime" "$ramp"
  printf 'rounds\t%s (server order rotated every row and round; one server running at a time)\n' "$rounds"
} >"$meta"

# Probe each server once: it starts, answers, and which flags it advertises.
mc=""
for s in "${server_list[@]}"; do
  port=$(free_port)
  start_server "$s" "$port" || exit 1
  flag=$(nbdinfo --json "nbd://127.0.0.1:$port" 2>/dev/null |
    python3 -c 'import json,sys; e=json.load(sys.stdin)["exports"][0]; print(("yes" if e.get("can_multi_conn") else "no") + ", size " + str(e["export-size"]))' ||
    echo "nbdinfo failed")
  stop_server
  mc="${mc:+$mc; }$s: $flag"
  log "probe $s: multi-conn $flag"
done
printf 'multi-conn advertised\t%s\n' "$mc" >>"$meta"

# ---------------------------------------------------------------- run
cells="$run_dir/cells.tsv"
: >"$cells"
failed=0
n=${#server_list[@]}
total=$(( ${#rows[@]} * rounds * n ))
done_cells=0
eta=$(( total * (runtime + ramp + 2) ))
log "$total cells of ${runtime}s (+${ramp}s ramp); about $(( eta / 60 )) min $(( eta % 60 )) s"
for ((ri = 0; ri < ${#rows[@]}; ri++)); do
  IFS='|' read -r id label rw bs qd _kind <<<"${rows[ri]}"
  for ((round = 1; round <= rounds; round++)); do
    for ((k = 0; k < n; k++)); do
      s=${server_list[(k + ri + round - 1) % n]}
      done_cells=$((done_cells + 1))
      out="$id.$s.r$round.json"
      # Flush dirty pages from the previous cell so that its writeback is not
      # charged to this one, and pull the whole file back into the page
      # cache: memory reclaim (this VM runs DAMON's proactive pageout) evicts
      # it between cells, and a cell that starts cold measures the disk.
      sync
      cat "$img" >/dev/null
      port=$(free_port)
      if ! start_server "$s" "$port"; then
        printf '%s\t%s\t%s\t%s\t\t\n' "$id" "$round" "$s" "server did not start" >>"$cells"
        failed=1
        continue
      fi
      status=ok
      if ! fio --name="$id" --ioengine=nbd --uri="nbd://127.0.0.1:$port" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$runtime" --ramp_time="$ramp" \
        --norandommap --randrepeat=1 --randseed=20251123 \
        --lat_percentiles=1 --percentile_list=50:99:99.9 \
        --output-format=json --output="$run_dir/$out" >"$run_dir/$out.stderr" 2>&1; then
        status="fio failed (see $out.stderr)"
      fi
      cpu=$(server_cpu)
      if ! kill -0 "$current_pid" 2>/dev/null; then
        status="$s died during the cell (see $s.log)"
      fi
      stop_server
      [ -s "$run_dir/$out.stderr" ] || rm -f "$run_dir/$out.stderr"
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$round" "$s" "$status" "$out" "$cpu" >>"$cells"
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
      log "[$done_cells/$total] $label, round $round, $s: $summary; file cached after the cell: $(cached_pct "$img" $((size_mib * 1048576)))"
    done
  done
done
printf 'load average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$meta"

# ---------------------------------------------------------------- report
python3 "$repo/benches/fio_report.py" "$run_dir" | tee "$report"
{
  echo
  echo "Report: ${report#"$repo"/}"
  echo "Raw fio JSON and server logs: $run_dir"
} >&2
exit "$failed"
