#!/usr/bin/env bash
# The whole test suite. Run as root on a fresh Debian machine, it first
# installs the Debian packages the tests use; then it runs formatting and lint
# checks, every unit, property and end-to-end test, and a short fuzzing pass.
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-fuzz  skip the fuzzing pass (quicker local runs)
#   scripts/test.sh --no-bench skip the benchmark harness's quick mode
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz=1
bench=1
for arg in "$@"; do
  case "$arg" in
    --no-fuzz) fuzz=0 ;;
    --no-bench) bench=0 ;;
    *) echo "scripts/test.sh: unknown option $arg (expected --no-fuzz or --no-bench)" >&2; exit 2 ;;
  esac
done

# Debian packages: real NBD clients and reference servers, fio, ext4 tools, FUSE.
# gnuplot-nox draws the benchmark harness's plots.
packages=(libnbd-bin python3-libnbd nbdkit fio e2fsprogs fuse3 util-linux gnuplot-nox)
# qemu-utils is usually preinstalled (sometimes newer than bookworm's): only
# install it when qemu-io is missing, so a newer build is never downgraded.
command -v qemu-io >/dev/null 2>&1 || packages+=(qemu-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing test tools: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "==> missing test tools (${missing[*]}); run as root to install them" >&2
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# The README's first command is `cargo run --release -- demo`: `cargo run`
# must name the tandem binary without --bin.
echo "==> cargo run -- --version"
cargo run --quiet -- --version

if [ "$bench" -eq 1 ]; then
  # The replication benchmark harness in its quick mode (under 2 minutes
  # once built), so that it keeps working: every cell must run (exit 0),
  # and the report must have its sections and plots.
  echo "==> benchmark harness, quick mode"
  bench_dir=$(mktemp -d)
  trap 'rm -rf "$bench_dir"' EXIT
  benches/replication-bench.sh --quick --work-dir "$bench_dir/work" \
    --results-dir "$bench_dir/results" >"$bench_dir/report.md" 2>"$bench_dir/progress.log" || {
    tail -n 30 "$bench_dir/progress.log" >&2
    echo "benchmark harness failed (report: $bench_dir/report.md)" >&2
    trap - EXIT
    exit 1
  }
  for section in "## Baselines" "## Replication: protocol" "## Against the limits" \
    "## Resync throughput" "## Memory and start-up" "## Plots"; do
    grep -q "^$section" "$bench_dir/report.md" || {
      echo "benchmark report lacks \"$section\" ($bench_dir/report.md)" >&2
      trap - EXIT
      exit 1
    }
  done
  # The QD1 row's idle-matched baselines ran and were read from their
  # per-I/O latency logs.
  grep -q "C limit, idle" "$bench_dir/report.md" &&
    ls "$bench_dir"/work/runs/*/randwrite-4k-qd1.serve-idle5ms.r1.lat.json >/dev/null 2>&1 || {
    echo "benchmark report lacks the idle-matched QD1 baselines ($bench_dir/report.md)" >&2
    trap - EXIT
    exit 1
  }
  for plot in latency throughput sizes; do
    ls "$bench_dir"/results/replication-*-quick-"$plot".png >/dev/null 2>&1 || {
      echo "benchmark plot $plot is missing" >&2
      trap - EXIT
      exit 1
    }
  done
fi

if [ "$fuzz" -eq 1 ]; then
  scripts/fuzz.sh 20
fi
echo "==> all tests passed"
