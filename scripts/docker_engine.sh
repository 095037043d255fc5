#!/usr/bin/env bash
# A Docker engine for `make images`, `make compose-demo` and the container tests.
#
# When an engine answers, it is used as it is and this prints "running". Otherwise Debian's
# docker.io (and debootstrap, for the base images) are installed when missing, dockerd is started
# with --bridge=none --iptables=false (every container here uses host networking) and this prints
# "started PID": the caller stops that daemon when it is done; one it found running it leaves.
# Idempotent; a failure is one line on stderr and exit status 1.
set -euo pipefail

log() { printf '[docker] %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

if docker info >/dev/null 2>&1; then
    echo running
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "no Docker engine answers and starting one needs root (or start Docker yourself)"
    sudo="sudo"
fi

missing=""
command -v dockerd >/dev/null 2>&1 || missing="docker.io"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || fail "no Docker engine and no apt-get to install $missing: install Docker by hand"
    log "installing$( [ -n "$missing" ] && printf ' %s' $missing) from Debian's packages"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086 # one word a package
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null \
        || fail "apt-get could not install$missing"
fi

logfile=${MEDSPLIT_DOCKERD_LOG:-/tmp/medsplit-dockerd.log}
log "starting dockerd (log: $logfile)"
$sudo sh -c "dockerd --bridge=none --iptables=false >'$logfile' 2>&1 & echo \$! >'$logfile.pid'"
pid=$(cat "$logfile.pid")
for _ in $(seq 1 120); do  # up to a minute, asking twice a second
    if docker info >/dev/null 2>&1; then
        echo "started $pid"
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || fail "dockerd exited at start: $(tail -n 3 "$logfile" | tr '\n' ' ')"
    sleep 0.5
done
fail "dockerd did not answer within 60 s: $(tail -n 3 "$logfile" | tr '\n' ' ')"
