#!/usr/bin/env bash
# A real install, not the checkout: build the wheel from a clean copy of the sources, install it
# into a fresh virtual environment outside the checkout and run the CLI from another directory.
# Catches what an editable install hides (package data left out of the wheel, paths that only
# resolve inside the checkout). The dependencies are reused from .venv (no network).
#
#   .ci/wheel_check.sh            # after `make install`; VENV=... for another environment
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fail() { echo "wheel_check: $*" >&2; exit 1; }

# 1. the wheel, from a copy of the tracked and not-ignored files: an in-tree build would leave
#    build/ and reuse whatever a stale build/ or *.egg-info holds
mkdir "$WORK/src" "$WORK/dist"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else  # an unpacked source tree: everything but what builds and runs leave behind
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -xf - -C "$WORK/src"
fi
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >/dev/null
WHEEL="$(ls "$WORK"/dist/autocompress-*.whl)"
echo "wheel_check: built $(basename "$WHEEL")"

# 2. a fresh environment outside the checkout; .venv's site-packages is appended through a .pth
#    (its own .pth files, among them the editable install's finder, are not processed), so the
#    dependencies are found but `autocompress` only comes from the wheel
"$PY" -m venv --without-pip "$WORK/env"
ENV_SITE="$("$WORK/env/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
DEPS_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
echo "$DEPS_SITE" > "$ENV_SITE/_autocompress_deps.pth"
"$PY" -m pip --python "$WORK/env/bin/python" install -q --no-deps --no-index "$WHEEL" >/dev/null

# 3. from another directory, the commands a new user runs first
cd "$WORK"
export COLUMNS=200 NO_COLOR=1  # rich: full names in tables, no escape codes to grep through
run() {  # run NAME PATTERN CMD...: exit 0 and print a line matching PATTERN (grep -E)
    local name="$1" pattern="$2"; shift 2
    local out rc=0
    out="$("$@" 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] || { echo "$out" >&2; fail "$name exited $rc"; }
    grep -Eq -- "$pattern" <<<"$out" || { echo "$out" >&2; fail "$name did not print /$pattern/"; }
    echo "wheel_check: $name ok"
}
where="$("$WORK/env/bin/python" -c 'import autocompress; print(autocompress.__file__)')"
case "$where" in
    "$ENV_SITE"/*) ;;
    *) fail "autocompress imported from $where, not from the installed wheel" ;;
esac
# a profile's row, not only the alias notes (with no profiles, `devices` prints an empty table)
run devices "jetson-orin-nano-8gb .* 68 GB/s" "$WORK/env/bin/autocompress" devices
run plan "wrote q4.json" "$WORK/env/bin/autocompress" plan \
    --config "$REPO/experiments/configs/llama-2-7b.json" --bits 4 --out q4.json
run estimate "tokens/s .* [0-9]" "$WORK/env/bin/autocompress" estimate q4.json --device jetson
run spaces "^joint bits$" "$WORK/env/bin/python" -c '
from autocompress.search.space import SearchSpace
print(SearchSpace.load("joint").name, SearchSpace.load("bits").name)'
echo "wheel_check: the installed wheel works"
