#!/bin/sh
# Installs what the test suite drives for real besides Python packages: headless Chromium and
# ffmpeg (player tests), Prometheus/promtool (ops tests), tus-js-client under Node (tus test), and
# hls.js, dash.js and tus-js-client for the browser (streaming player and /ui/ tests).
# Safe to run again: it installs only what is missing.
set -eu
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in chromium ffmpeg prometheus; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
for dir in tests/js tests/players; do
  if [ -f "$dir/package.json" ] && [ ! -d "$dir/node_modules" ]; then
    (cd "$dir" && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --silent; else npm install --no-audit --no-fund --silent; fi)
  fi
done
