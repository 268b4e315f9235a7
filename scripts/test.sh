#!/usr/bin/env bash
# The whole test suite. Run as root on a fresh Debian machine, it first
# installs the Debian packages the tests use; then it runs formatting and lint
# checks, every unit, property and end-to-end test, and a short fuzzing pass.
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-fuzz  skip the fuzzing pass (quicker local runs)
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz=1
for arg in "$@"; do
  case "$arg" in
    --no-fuzz) fuzz=0 ;;
    *) echo "scripts/test.sh: unknown option $arg (expected --no-fuzz)" >&2; exit 2 ;;
  esac
done

# Debian packages: real NBD clients and reference servers, fio, ext4 tools, FUSE.
packages=(libnbd-bin python3-libnbd nbdkit fio e2fsprogs fuse3 util-linux)
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

if [ "$fuzz" -eq 1 ]; then
  scripts/fuzz.sh 20
fi
echo "==> all tests passed"
