#!/usr/bin/env bash
# Best effort: Debian's Chromium and the npm package playwright-core (pinned) for the browser test of the
# training tab. The test skips itself when either is missing, so a failure here only costs that one test.
# playwright-core goes into .ci/node (ignored by git); print the NODE_PATH to use on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 ||
    echo "browser-tools: chromium could not be installed; the browser test will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1 && [ ! -d .ci/node/node_modules/playwright-core ]; then
  npm install --silent --no-audit --no-fund --prefix .ci/node playwright-core@1.65.1 >&2 ||
    echo "browser-tools: playwright-core could not be installed; the browser test will be skipped" >&2
fi
echo "$PWD/.ci/node/node_modules"
