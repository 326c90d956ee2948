#!/bin/sh
# Copies the browser libraries the page at /ui/ bundles from npm into gateway/ui/vendor/, each
# with its license: hls.js's light build (plays .m3u8 through Media Source Extensions) and
# tus-js-client's browser build (resumable uploads). Versions are pinned in
# tests/players/package.json + package-lock.json; tests/test_webui.py checks that the vendored
# copies are byte for byte those packages' files. Run it after changing those versions; commit
# the result. (A development step: the page must load nothing from outside the gateway, so the
# files ship inside the Python package.)
set -eu
cd "$(dirname "$0")/.."
(cd tests/players && npm ci --no-audit --no-fund --silent)
src=tests/players/node_modules
dst=gateway/ui/vendor
mkdir -p "$dst"
cp "$src/hls.js/dist/hls.light.min.js" "$dst/hls.light.min.js"
cp "$src/hls.js/LICENSE" "$dst/hls.js-LICENSE.txt"
cp "$src/tus-js-client/dist/tus.min.js" "$dst/tus.min.js"
# tus.min.js is a browserify bundle: its license, then those of the packages bundled inside it.
{
  cat "$src/tus-js-client/LICENSE"
  for dep in js-base64 url-parse querystringify requires-port; do
    printf '\n\n---- %s (bundled in tus.min.js) ----\n\n' "$dep"
    cat "$src/$dep"/LICENSE*
  done
  printf '\n\n---- buffer, base64-js (MIT) and ieee754 (BSD-3-Clause), by Feross Aboukhadijeh: browserify'"'"'s Buffer shim, bundled in tus.min.js ----\n'
} > "$dst/tus-js-client-LICENSE.txt"
for pkg in hls.js tus-js-client; do
  printf '%s %s\n' "$pkg" "$(node -p "require('./$src/$pkg/package.json').version")"
done > "$dst/VERSIONS.txt"
echo "vendored into $dst:"; cat "$dst/VERSIONS.txt"
