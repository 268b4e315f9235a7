#!/usr/bin/env bash
# Resync benchmark: unthrottled resync of a two-node tandem pair on loopback
# against a raw copy (dd) between the same backing files, and resync time
# against the dirty amount (100 %, 10 % and 1 % of the device).
#
#   benches/resync-bench.sh               4 GiB device
#   benches/resync-bench.sh --quick       512 MiB device
#   benches/resync-bench.sh --size-mib N
#
# Options: --size-mib N [BENCH_SIZE_MIB, 4096], --quick, --no-build,
# --work-dir DIR [BENCH_WORK_DIR, benches/work]; TANDEM_BIN runs another
# binary (an A/B against an older build) instead of target/release/tandem.
# The markdown report goes to stdout and to benches/results/resync-<date>.md;
# progress to stderr; the daemons' logs stay in <work-dir>/resync-<date>/.
# Exit status: 0 when every row ran, 1 when one failed, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${BENCH_SIZE_MIB:-4096}"
work="${BENCH_WORK_DIR:-benches/work}"
build=1
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; size_mib=512 ;;
    --no-build) build=0 ;;
    --size-mib) size_mib="${2:?--size-mib needs N}"; shift ;;
    --work-dir) work="${2:?--work-dir needs DIR}"; shift ;;
    -h|--help) sed -n '2,/^# Exit status/p' "$0" | sed -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "resync-bench: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$size_mib" in ''|*[!0-9]*) echo "resync-bench: --size-mib needs a number" >&2; exit 2 ;; esac
log() { echo "[resync-bench $(date +%H:%M:%S)] $*" >&2; }
command -v fio >/dev/null || { echo "resync-bench: fio is needed (apt-get install fio)" >&2; exit 2; }

[ "$build" = 1 ] && cargo build --release -q -p tandem
T="${TANDEM_BIN:-$PWD/target/release/tandem}"
stamp="$(date +%Y-%m-%d-%H%M%S)"
dir="$work/resync-$stamp"
mkdir -p "$dir/etc" "$dir/alpha" "$dir/beta" benches/results
dir="$(cd "$dir" && pwd)"
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ra=$(port); rb=$(port); na=$(port); nb=$(port)
cat > "$dir/etc/r0.toml" <<EOF
protocol = "C"
[net]
shared-secret = "bench"
connect-int = "1s"
[disk]
resync-rate = "100GiB"
[[node]]
name = "alpha"
address = "127.0.0.1:$ra"
disk = "$dir/alpha.img"
meta-disk = "internal"
nbd = "127.0.0.1:$na"
[[node]]
name = "beta"
address = "127.0.0.1:$rb"
disk = "$dir/beta.img"
meta-disk = "internal"
nbd = "127.0.0.1:$nb"
EOF
tdm() { local node=$1; shift; "$T" --config-dir "$dir/etc" --node "$node" --run-dir "$dir/$node" "$@"; }
cleanup() {
  for n in alpha beta; do
    if [ -f "$dir/$n/r0.pid" ]; then
      tdm "$n" down r0 --force >/dev/null 2>&1 || kill -9 "$(cat "$dir/$n/r0.pid")" 2>/dev/null || true
    fi
  done
  rm -f "$dir/alpha.img" "$dir/beta.img"
}
trap cleanup EXIT
now() { date +%s.%N; }
json() { tdm "$1" status r0 --json | python3 -c "import json,sys;r=json.load(sys.stdin)['resources'][0];print(eval(sys.argv[1]))" "$2"; }
# Seconds between the last "resync starts" and "resync finished" lines of
# beta's log: the resync itself, without connecting.
phase() {
  python3 - "$dir/beta/r0.log" <<'PY'
import sys, datetime
start = end = None
for line in open(sys.argv[1], errors="replace"):
    ts = line.split(" ", 1)[0]
    if "resync starts" in line:
        start = ts
    elif "resync finished" in line:
        end = ts
p = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
print((p(end) - p(start)).total_seconds() if start and end else float("nan"))
PY
}
# Lines of beta's log saying a resync finished; take it before starting one
# and hand it to wait_synced.
finished() { grep -c "resync finished" "$dir/beta/r0.log" || true; }
# Wait until beta logs a resync finished beyond $1 lines, reading its log
# from one process: polling `tandem dstate` meanwhile started two processes
# every 20 ms (about 2 ms of CPU each), which took 5-10 % of the two vCPUs
# from the resync being measured. Then check the states.
wait_synced() {
  python3 - "$dir/beta/r0.log" "$1" <<'PY' || exit 1
import sys, time
path, before = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 3600
while sum("resync finished" in line for line in open(path, errors="replace")) <= before:
    if time.time() > deadline:
        sys.exit("resync-bench: no sync within an hour")
    time.sleep(0.02)
PY
  local deadline=$(( $(date +%s) + 3600 ))
  until [ "$(tdm beta dstate r0)" = "UpToDate/UpToDate" ] && [ "$(tdm alpha cstate r0)" = "Connected" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "resync-bench: no sync within an hour" >&2; exit 1; }
    sleep 0.02
  done
}

# Backing files: the data area plus room for the metadata.
truncate -s "$(( (size_mib + 64) * 1024 * 1024 ))" "$dir/alpha.img" "$dir/beta.img"
log "filling alpha's $size_mib MiB with random data"
dd if=/dev/urandom of="$dir/alpha.img" bs=1M count="$size_mib" conv=notrunc,fdatasync status=none
tdm alpha create-md r0 >/dev/null
tdm beta create-md r0 >/dev/null
data=$(tdm alpha dump-md r0 --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["data-size"])')

log "raw copy baseline (dd, then fdatasync)"
raw_best=0
for _ in 1 2; do
  t0=$(now)
  dd if="$dir/alpha.img" of="$dir/beta.img" bs=1M count=$((data / 1048576)) conv=notrunc,fdatasync status=none
  t1=$(now)
  r=$(python3 -c "print(int($data / ($t1 - $t0)))")
  [ "$r" -gt "$raw_best" ] && raw_best=$r
done
log "loopback TCP baseline (one stream, 1 MiB sends, as much as the device)"
tcp=$(python3 - "$data" <<'PY'
import socket, sys, threading, time
total = int(sys.argv[1]); chunk = b"x" * (1 << 20)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept(); b = memoryview(bytearray(1 << 20))
    while c.recv_into(b):
        pass
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(srv.getsockname())
t0 = time.time(); sent = 0
while sent < total:
    s.sendall(chunk); sent += len(chunk)
s.close(); t.join()
print(int(sent / (time.time() - t0)))
PY
)
# Beta must not already hold alpha's data (zero its data area again).
dd if=/dev/zero of="$dir/beta.img" bs=1M count=$((data / 1048576)) conv=notrunc,fdatasync status=none

tdm alpha up r0 2>"$dir/alpha.up.log"
tdm beta up r0 2>"$dir/beta.up.log"
until [ "$(tdm alpha cstate r0)" = "Connected" ]; do sleep 0.05; done

rows=()
log "full sync (100 % dirty): primary --force on a never-synced pair"
n=$(finished)
t0=$(now)
tdm alpha primary r0 --force
wait_synced "$n"
t1=$(now)
full_s=$(python3 -c "print($t1 - $t0)")
sent=$(json alpha 'r["counters"]["resync-bytes-sent"]')
full_s=$(phase)
rows+=("100 %|$sent|$full_s|$(python3 -c "print($t1 - $t0)")")

for pct in 10 1; do
  log "$pct % dirty: beta away, fio writes $pct % of the device in 1 MiB blocks"
  tdm beta disconnect r0
  until [ "$(tdm alpha cstate r0)" = "WFConnection" ]; do sleep 0.05; done
  fio --name=dirty --ioengine=nbd --uri="nbd://127.0.0.1:$na" --rw=randwrite --bs=1m \
    --size="$data" --io_size=$((data * pct / 100 / 1048576 * 1048576)) --iodepth=8 \
    --randseed=$pct --output=/dev/null >/dev/null
  oos=$(json alpha 'r["out-of-sync-bytes"]')
  before=$(json alpha 'r["counters"]["resync-bytes-sent"]')
  n=$(finished)
  t0=$(now)
  tdm beta connect r0
  wait_synced "$n"
  t1=$(now)
  after=$(json alpha 'r["counters"]["resync-bytes-sent"]')
  rows+=("$pct %|$((after - before))|$(phase)|$(python3 -c "print($t1 - $t0)")")
done

# Client latency during a resync: fio 4 KiB random writes at QD1 on the
# Primary for 5 s, on an idle pair, and while beta resyncs everything
# (invalidate) with the dynamic controller (c-min-rate 250KiB, the default)
# and without it (c-min-rate = resync-rate). resync-rate is 400MiB here so
# that an uncontrolled full resync outlasts the 5 s.
qd1() {
  local out="$dir/qd1-$1.json"
  fio --name=qd1 --ioengine=nbd --uri="nbd://127.0.0.1:$na" --rw=randwrite --bs=4k \
    --iodepth=1 --size="$data" --time_based --runtime=5 --randseed=7 \
    --output-format=json --output="$out" >/dev/null
  python3 - "$out" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print(f'{j["iops"]:.0f}|{p["50.000000"]/1000:.0f}|{p["99.000000"]/1000:.0f}')
PY
}
restart_with() {
  tdm alpha secondary r0
  tdm alpha down r0
  tdm beta down r0
  sed -i -e "s/^resync-rate = .*/resync-rate = \"400MiB\"/" -e "/^c-min-rate/d" "$dir/etc/r0.toml"
  sed -i -e "s/^\[disk\]/[disk]\n$1/" "$dir/etc/r0.toml"
  tdm alpha up r0 2>>"$dir/alpha.up.log"
  tdm beta up r0 2>>"$dir/beta.up.log"
  until [ "$(tdm alpha dstate r0)" = "UpToDate/UpToDate" ] && [ "$(tdm alpha cstate r0)" = "Connected" ]; do sleep 0.05; done
  tdm alpha primary r0
}
lat=()
log "client latency on an idle pair"
restart_with 'c-min-rate = "250KiB"'
lat+=("idle pair|$(qd1 idle)|")
for mode in controlled uncontrolled; do
  if [ "$mode" = uncontrolled ]; then restart_with 'c-min-rate = "400MiB"'; fi
  log "client latency during a full resync ($mode)"
  before=$(json beta 'r["counters"]["resync-bytes-received"]')
  n=$(finished)
  tdm beta invalidate r0
  r=$(qd1 "$mode")
  moved=$(( $(json beta 'r["counters"]["resync-bytes-received"]') - before ))
  lat+=("full resync, $mode|$r|$((moved / 5 / 1000000))")
  wait_synced "$n"
done
tdm alpha secondary r0
tdm alpha down r0
tdm beta down r0
cmp -n "$data" "$dir/alpha.img" "$dir/beta.img" || { echo "resync-bench: the replicas differ after the resyncs" >&2; exit 1; }

report="benches/results/resync-$stamp.md"
{
  echo "## Resync ($((data / 1048576)) MiB device, $(nproc) vCPUs, $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD)$([ -n "${TANDEM_BIN:-}" ] && echo ", binary $TANDEM_BIN"))"
  echo
  echo "Command: \`benches/resync-bench.sh$([ "$quick" = 1 ] && echo " --quick" || echo " --size-mib $size_mib")\`. Protocol C, both nodes on loopback on this machine, \`resync-rate = \"100GiB\"\` (unthrottled). *Resync time* is the SyncTarget's log from \`resync starts\` (generations compared, bitmaps about to be exchanged) to \`resync finished\` (everything written and flushed); *wall time* runs from the command that starts it (\`primary --force\`, \`connect\`) until the SyncTarget logs \`resync finished\` (read from its log every 20 ms, so that no process is started meanwhile) and \`dstate\` then reads UpToDate/UpToDate, so it adds connecting (connect-int 1 s) and the polling. Raw copy: \`dd bs=1M conv=fdatasync\` between the same backing files, best of two."
  echo
  echo "| Dirty | Resync bytes | Resync time (s) | MB/s | vs raw copy | Time vs 100 % | Wall time (s) |"
  echo "|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    IFS='|' read -r what bytes secs wall <<<"$row"
    python3 - "$what" "$bytes" "$secs" "$raw_best" "$full_s" "$wall" <<'PY'
import sys
what, b, s, raw, full, wall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
rate = b / s
print(f"| {what} | {b} | {s:.3f} | {rate/1e6:.0f} | {rate/raw:.2f} | {s/full:.3f} | {wall:.2f} |")
PY
  done
  echo "| raw copy | $data | | $(python3 -c "print(int($raw_best/1e6))") | 1.00 | | |"
  echo "| loopback TCP, one stream | $data | | $(python3 -c "print(int($tcp/1e6))") | $(python3 -c "print(f'{$tcp/$raw_best:.2f}')") | | |"
  echo
  echo "Client latency during a resync: fio 4 KiB random writes, QD1, 5 s, on the Primary; \`resync-rate = \"400MiB\"\`; the controller is \`c-min-rate = \"250KiB\"\` (the default), *uncontrolled* sets \`c-min-rate\` to the resync rate."
  echo
  echo "| Pair | IOPS | p50 (µs) | p99 (µs) | resync MB/s meanwhile |"
  echo "|---|---|---|---|---|"
  for row in "${lat[@]}"; do
    IFS='|' read -r what iops p50 p99 mbs <<<"$row"
    echo "| $what | $iops | $p50 | $p99 | ${mbs:--} |"
  done
} | tee "$report"
log "report: $report"
