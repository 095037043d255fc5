#!/usr/bin/env bash
# `make images`: the edge and aggregator images, built air-gapped from a wheelhouse.
#
# 1. a Docker engine (scripts/docker_engine.sh), 2. the base images, made locally when absent
# (scripts/base_images.sh), 3. the wheelhouse (scripts/wheelhouse.sh; OFFLINE=1 uses the one in
# $WHEELHOUSE as it is, for a host without internet), 4. docker build of both targets, tagged
# medsplit-edge:VERSION and medsplit-aggregator:VERSION (and :latest).
# Prints the started dockerd's pid file line ("started PID") when it had to start one.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${MEDSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medsplit}
export WHEELHOUSE=${WHEELHOUSE:-$cache/wheelhouse}
log() { printf '[images] %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

engine=$(bash "$here/scripts/docker_engine.sh")
case $engine in started*) echo "$engine" ;; esac
# The base images (debootstrap) and the wheelhouse (pip) need each other not: side by side.
bash "$here/scripts/base_images.sh" & bases=$!
if [ "${OFFLINE:-0}" = 1 ]; then
    [ -d "$WHEELHOUSE/deps" ] && [ -d "$WHEELHOUSE/app" ] \
        || fail "OFFLINE=1 but $WHEELHOUSE holds no wheelhouse: copy one made by scripts/wheelhouse.sh"
else
    bash "$here/scripts/wheelhouse.sh" >/dev/null
fi
wait "$bases" || fail "the base images could not be made (above)"
version=$(basename "$(ls "$WHEELHOUSE"/app/medsplit-*.whl)" | cut -d- -f2)

build() {  # TARGET [TAG...]: one stage of docker/Dockerfile, its log in the cache
    local target=$1 start
    shift
    start=$(date +%s)
    docker build --quiet --network host -f "$here/docker/Dockerfile" --target "$target" \
        --build-arg "VERSION=$version" ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} \
        "$@" "$WHEELHOUSE" >"$cache/build-$target.log" 2>&1 \
        || fail "docker build --target $target failed: $(tail -n 5 "$cache/build-$target.log" | tr '\n' ' ')"
    log "$target built in $(( $(date +%s) - start )) s"
}

# One after the other: the second reuses the first's core layer (torch and the rest); built
# side by side they were slower here, both copying a gigabyte at once.
build aggregator -t "medsplit-aggregator:$version" -t medsplit-aggregator:latest
build edge -t "medsplit-edge:$version" -t medsplit-edge:latest
for target in aggregator edge; do
    log "medsplit-$target:$version: $(docker image inspect -f '{{.Size}}' "medsplit-$target:$version" | awk '{printf "%.0f MB", $1/1e6}')"
done
