# Helpers shared by the benchmark scripts (sourced, not run).
# shellcheck shell=bash

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The first line a command prints (versions for the reports).
first_line() { "$@" 2>&1 | head -n 1; }

# cached_pct FILE SIZE_BYTES: share of FILE in the page cache, e.g. "100%".
cached_pct() {
  if command -v fincore >/dev/null 2>&1; then
    fincore --bytes --noheadings --output RES "$1" 2>/dev/null |
      awk -v size="$2" '{printf "%.0f%%", 100 * $1 / size}'
  else
    echo "unknown (no fincore)"
  fi
}

# evict_cache FILE...: write FILE's dirty pages back, then drop it from the
# page cache, so that every server starts a cell from the same state. What
# the cache held matters more than it should on this kernel: after
# sequential or read-ahead I/O the file sits in large folios, and each 4 KiB
# write into one of them walks all its buffer heads (ext4_block_write_begin
# took a third of a server's CPU and cut serve's 4 KiB QD32 rate from 100k
# to 24k IOPS in one round). The rows are aligned writes, which never read
# the old data, so an evicted file costs them no disk reads.
evict_cache() {
  python3 - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
PY
}

# exact_latency PREFIX JSON: the percentiles of every I/O's total latency
# in fio's log PREFIX_lat.1.log (--write_lat_log=PREFIX --log_avg_msec=0,
# one "msec, nsec, direction, bs, offset" line per I/O after the ramp), by
# nearest rank, written next to JSON as JSON's name with .lat.json for
# fio_report.py to prefer over fio's bucketed ones; the logs are removed
# (a QD1 cell logs about a hundred thousand lines).
exact_latency() {
  python3 - "$1" "$2" <<'PY' || return 1
import json, math, sys
prefix, out = sys.argv[1], sys.argv[2]
with open(prefix + "_lat.1.log", encoding="utf-8") as f:
    lat = sorted(int(line.split(",")[1]) for line in f if line.strip())
if not lat:
    sys.exit(f"{prefix}_lat.1.log: no I/O logged")
pct = {f"{p:.6f}": lat[max(0, math.ceil(p / 100 * len(lat)) - 1)] for p in (50, 99, 99.9)}
with open(out[: -len(".json")] + ".lat.json", "w", encoding="utf-8") as f:
    json.dump({"ios": len(lat), "percentile_ns": pct}, f)
PY
  rm -f "$1"_lat.1.log "$1"_clat.1.log "$1"_slat.1.log
}

# proc_cpu PID: CPU seconds (user+system) the process has used so far.
proc_cpu() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo ""; return; }
  stat=${stat##*) }   # drop "pid (comm) "; fields now start at field 3
  # shellcheck disable=SC2086
  set -- $stat
  python3 -c "import os,sys; print(f'{(int(sys.argv[1]) + int(sys.argv[2])) / os.sysconf(\"SC_CLK_TCK\"):.2f}')" "${12}" "${13}"
}

# launch_nbd_server NAME TANDEM_BIN FILE PORT LOG: start an NBD server of
# FILE on 127.0.0.1:PORT in the background, its output appended to LOG; the
# caller takes its pid from $!. NAME is tandem (`tandem serve`), nbdkit (the
# file plugin with its defaults: parallel thread model, 16 threads, page
# cache) or qemu-nbd (-t keeps serving after the first client leaves;
# writeback cache, no O_DIRECT, like the others).
launch_nbd_server() {
  local name=$1 tandem=$2 file=$3 port=$4 log=$5
  case "$name" in
    tandem) "$tandem" serve "$file" --listen "127.0.0.1:$port" >>"$log" 2>&1 & ;;
    nbdkit) nbdkit -f --exit-with-parent -p "$port" -i 127.0.0.1 file "$file" >>"$log" 2>&1 & ;;
    qemu-nbd) qemu-nbd -f raw -t -p "$port" -b 127.0.0.1 --cache=writeback --aio=threads "$file" >>"$log" 2>&1 & ;;
    *) echo "launch_nbd_server: unknown server $name" >&2; return 2 ;;
  esac
}
