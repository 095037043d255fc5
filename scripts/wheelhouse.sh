#!/usr/bin/env bash
# The wheelhouse the images install from with --no-index: build it where PyPI is reachable,
# copy it (with this repository) to a host without internet, build the images there.
#
#   $WHEELHOUSE/deps/            every dependency of medsplit[edge] and medsplit[aggregator]
#   $WHEELHOUSE/requirements/    core.txt, edge.txt, aggregator.txt: exact pins, per image;
#                                edge-nodeps.txt: installed without their pins (openmined-psi)
#   $WHEELHOUSE/app/             medsplit's own wheel, rebuilt every time (seconds)
#
# Dependencies are fetched only when pyproject.toml or constraints.txt changed since the last
# build (their hash is kept in deps/.key). WHEELHOUSE defaults to ~/.cache/medsplit/wheelhouse;
# PYTHON must be the Python of the image (3.11 for the default base). For a CUDA image, add
# PIP_EXTRA_INDEX_URL with a CUDA torch and a constraints file that pins it (docs/deployment.md).
# MODELS=1 adds the model catalogue (torchvision, MONAI: medsplit[models]) to both images
# (docs/bring-your-own-model.md).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${MEDSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medsplit}
out=${WHEELHOUSE:-$cache/wheelhouse}
python=${PYTHON:-$here/.venv/bin/python}
constraints=${CONSTRAINTS:-$here/constraints.txt}
models=""
if [ "${MODELS:-0}" = 1 ]; then models=",models"; fi
[ -x "$python" ] || python=python3

log() { printf '[wheelhouse] %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
pip() { "$python" -m pip --disable-pip-version-check "$@"; }

mkdir -p "$out"
# Vertical jobs' PSI library pins protobuf below what onnx needs; it runs on the newer one, so
# the edge image installs it without its pins (as scripts/setup.sh does; docs/vertical.md).
psi=$(sed -n 's/^openmined-psi==//p' "$constraints" "$here/constraints.txt" | head -n 1)
key=$( (cat "$here/pyproject.toml" "$constraints"; echo "$models psi=$psi") | sha256sum | cut -c1-16)

log "medsplit's wheel"
rm -rf "$out/app.partial" && mkdir -p "$out/app.partial"
pip wheel --quiet --no-deps --wheel-dir "$out/app.partial" "$here" >"$out/app.log" 2>&1 \
    || fail "building medsplit's wheel failed: $(tail -n 3 "$out/app.log" | tr '\n' ' ')"
rm -rf "$out/app" && mv "$out/app.partial" "$out/app"
wheel=$(ls "$out"/app/medsplit-*.whl)
version=$(basename "$wheel" | cut -d- -f2)

if [ -f "$out/deps/.key" ] && [ "$(cat "$out/deps/.key")" = "$key" ]; then
    log "dependencies: up to date ($(ls "$out/deps" | wc -l) wheels)"
else
    log "dependencies of medsplit[edge,aggregator$models] with $(basename "$constraints")"
    rm -rf "$out/deps.partial"
    pip wheel --quiet -c "$constraints" --wheel-dir "$out/deps.partial" \
        --find-links "$out/app" "medsplit[edge,aggregator$models]==$version" >"$out/deps.log" 2>&1 \
        || fail "pip wheel failed: $(grep -m1 -i error "$out/deps.log" || tail -n 1 "$out/deps.log")"
    rm -f "$out"/deps.partial/medsplit-*.whl
    pip download --quiet --no-deps --only-binary=:all: --dest "$out/deps.partial" \
        "openmined-psi==$psi" >>"$out/deps.log" 2>&1 \
        || fail "pip download openmined-psi==$psi failed: $(tail -n 1 "$out/deps.log")"
    mkdir -p "$out/requirements"
    for extra in core edge aggregator; do
        spec="medsplit==$version"
        [ "$extra" = core ] || spec="medsplit[$extra$models]==$version"
        pip install --quiet --dry-run --ignore-installed --no-index --report "$out/report.json" \
            --find-links "$out/deps.partial" --find-links "$out/app" "$spec" >/dev/null \
            || fail "the wheelhouse cannot install $spec"
        "$python" - "$out/report.json" >"$out/requirements/$extra.txt" <<'PY'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"] != "medsplit":
        print(f"{meta['name']}=={meta['version']}")
PY
    done
    rm -f "$out/report.json"
    echo "openmined-psi==$psi" >"$out/requirements/edge-nodeps.txt"
    echo "$key" >"$out/deps.partial/.key"
    rm -rf "$out/deps" && mv "$out/deps.partial" "$out/deps"
    log "$(ls "$out/deps" | wc -l) wheels, $(du -sh "$out/deps" | cut -f1)"
fi
echo "$out"
