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
