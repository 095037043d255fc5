#!/usr/bin/env bash
# The base images the Dockerfiles and compose.yaml name, made locally when no registry is
# reachable: a debootstrapped Debian of the same release, imported under the same name.
#
#   python:3.11-slim-bookworm  Debian bookworm (minbase) with python3 and python3-venv
#   eclipse-mosquitto:2.0.20    the same with Debian's mosquitto (2.0.11), /usr/sbin/mosquitto
#                               as in the official image
#
# An image already present (pulled from a registry or a mirror, or made by an earlier run) is
# left alone. Root file systems are cached as tarballs in $MEDSPLIT_CACHE (default
# ~/.cache/medsplit), so a second machine-local run costs seconds. Needs debootstrap and root.
set -euo pipefail

PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
MOSQUITTO_IMAGE=${MOSQUITTO_IMAGE:-eclipse-mosquitto:2.0.20}
RELEASE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${MEDSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medsplit}

log() { printf '[base-images] %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
present() { docker image inspect "$1" >/dev/null 2>&1; }

mkdir -p "$cache"
work=$(mktemp -d "$cache/rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# tidy ROOT: what an image does not need (package lists, caches, docs)
tidy() {
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
        "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*
}

python_rootfs() {  # -> $cache/python-$RELEASE.tar
    local tar=$cache/python-$RELEASE.tar
    if [ ! -f "$tar" ]; then
        command -v debootstrap >/dev/null 2>&1 || fail "debootstrap is missing: apt-get install debootstrap (or pull $PYTHON_IMAGE)"
        log "debootstrap $RELEASE with python3 (about a minute, once)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$RELEASE" "$work/python" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
            || fail "debootstrap failed: $(tail -n 3 "$work/debootstrap.log" | tr '\n' ' ')"
        tidy "$work/python"
        tar -C "$work/python" -cf "$tar.partial" . && mv "$tar.partial" "$tar"
        rm -rf "$work/python"
    fi
    echo "$tar"
}

mosquitto_rootfs() {  # -> $cache/mosquitto-$RELEASE.tar, from the python root file system
    local tar=$cache/mosquitto-$RELEASE.tar root=$work/mosquitto
    if [ ! -f "$tar" ]; then
        log "adding Debian's mosquitto to a copy of that root file system"
        mkdir -p "$root"
        tar -C "$root" -xf "$(python_rootfs)"
        cp /etc/resolv.conf "$root/etc/resolv.conf"
        chroot "$root" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends mosquitto" >"$work/apt.log" 2>&1 \
            || fail "installing mosquitto failed: $(tail -n 3 "$work/apt.log" | tr '\n' ' ')"
        mkdir -p "$root/mosquitto/config" "$root/mosquitto/data"
        tidy "$root"
        tar -C "$root" -cf "$tar.partial" . && mv "$tar.partial" "$tar"
    fi
    echo "$tar"
}

if present "$PYTHON_IMAGE"; then
    log "$PYTHON_IMAGE: present"
else
    docker import -c 'CMD ["python3"]' -c 'ENV LANG=C.UTF-8' \
        -m "medsplit stand-in: debootstrapped Debian $RELEASE" \
        "$(python_rootfs)" "$PYTHON_IMAGE" >/dev/null
    log "$PYTHON_IMAGE: imported from a debootstrapped Debian $RELEASE"
fi
if present "$MOSQUITTO_IMAGE"; then
    log "$MOSQUITTO_IMAGE: present"
else
    docker import -c 'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]' \
        -c 'EXPOSE 1883 8883' -m "medsplit stand-in: Debian $RELEASE's mosquitto" \
        "$(mosquitto_rootfs)" "$MOSQUITTO_IMAGE" >/dev/null
    log "$MOSQUITTO_IMAGE: imported from Debian $RELEASE's mosquitto"
fi
