#!/usr/bin/env bash
# Build the docs site and take screenshots of its pages with headless Chromium (Debian: apt-get install chromium).
#
#   tools/screenshot.sh OUT_DIR [PAGE ...]
#
# PAGE is a page's path in the built site: "" or "index" for the home page, "reference/hooks" for
# docs/reference/hooks.md (default: the home page and the hooks reference). Each lands in OUT_DIR as a PNG named
# after the page (home.png, reference-hooks.png). The site is built with --strict into a temporary folder and served
# on 127.0.0.1 for the duration (Material's search and scripts need http://, not file://).
#
# Settings (environment): MKDOCS (default: .venv/bin/mkdocs, else mkdocs), PYTHON (default: python3), CHROMIUM
# (default: chromium), WINDOW (default: 1280,900), PORT (default: a free one), MKDOCS_CONFIG (default: mkdocs.yml).
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
pages=("$@")
[ ${#pages[@]} -gt 0 ] || pages=("" "reference/hooks")

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -z "${MKDOCS:-}" ]; then
    if [ -x .venv/bin/mkdocs ]; then MKDOCS=.venv/bin/mkdocs; else MKDOCS=mkdocs; fi
fi
PYTHON=${PYTHON:-python3}
CHROMIUM=${CHROMIUM:-chromium}
WINDOW=${WINDOW:-1280,900}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
command -v "$CHROMIUM" >/dev/null || { echo "no $CHROMIUM: apt-get install chromium, or set CHROMIUM" >&2; exit 1; }

site=$(mktemp -d)
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    rm -rf "$site"
}
trap cleanup EXIT

# Not --quiet: MkDocs counts the warnings --strict fails on only when it logs them.
NO_MKDOCS_2_WARNING=1 "$MKDOCS" build --strict --config-file "${MKDOCS_CONFIG:-mkdocs.yml}" --site-dir "$site" \
    >"$site.log" 2>&1 || { cat "$site.log" >&2; rm -f "$site.log"; exit 1; }
rm -f "$site.log"
"$PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
for _ in $(seq 50); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break
    sleep 0.1
done

for page in "${pages[@]}"; do
    page=${page%/}
    [ "$page" = "index" ] && page=""
    name=${page//\//-}
    png="$out/${name:-home}.png"
    url="http://127.0.0.1:$PORT/${page:+$page/}"
    # --no-sandbox: Chromium refuses to run as root without it (containers, CI).
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --mute-audio \
        --window-size="$WINDOW" --virtual-time-budget=5000 --screenshot="$png" "$url" >/dev/null 2>&1
    [ -s "$png" ] || { echo "no screenshot of $url" >&2; exit 1; }
    echo "$png  ($url)"
done
