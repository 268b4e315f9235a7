#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 20). Installs cargo-fuzz if
# needed. The machine has only a stable toolchain; cargo-fuzz needs -Z flags,
# hence RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  echo "==> fuzzing $target for ${secs}s"
  mkdir -p "fuzz/corpus/$target"
  log="fuzz/artifacts/$target.log"
  mkdir -p fuzz/artifacts
  if ! cargo fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $target failed (log and crash input in fuzz/artifacts/)" >&2
    exit 1
  fi
  grep -E "^(#[0-9]+\s+DONE|Done )" "$log" || true
done
