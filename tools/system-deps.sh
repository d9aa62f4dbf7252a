#!/usr/bin/env bash
# What `make test` needs beyond the Python packages, installed once (each step is skipped when
# already there): Debian packages as root, playwright-core from npm. Without them the tests that
# need them skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages the tests use, from Debian (skipped when already installed):
# - qemu-user-static: tests/parity/test_emulated_cpus.py runs bundles on aarch64 cores and on an
#   AVX2-only x86 CPU this machine does not have (its arm64 Python packages come through a private
#   apt state, so no `dpkg --add-architecture arm64`);
# - chromium: the browser tests of the HTML report and the operator page (tests/browser), driven
#   by playwright-core from npm.
need=()
command -v qemu-aarch64-static >/dev/null && command -v qemu-x86_64-static >/dev/null || need+=(qemu-user-static)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           "${need[@]}"; } >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      echo "system-deps: installing ${need[*]} failed" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "system-deps: not root, ${need[*]} not installed; the tests that need them will skip" >&2
  fi
fi
# playwright-core, pinned by tests/browser/package-lock.json (it drives /usr/bin/chromium; no
# browser download).
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund --silent
fi
