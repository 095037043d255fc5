#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment with the project installed
# against constraints.txt, and Mosquitto from Debian's packages when it is missing.
# Re-running it when everything is in place takes a second or two.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
python=${PYTHON:-python3}
stamp=$venv/.medsplit-installed

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi

# Reinstall only when the dependency declarations changed since the last install.
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ] || [ "$here/constraints.txt" -nt "$stamp" ]; then
    log "installing medsplit[dev] with constraints.txt"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$here/constraints.txt" -e "$here[dev]"
    touch "$stamp"
else
    log "python packages up to date"
fi

# Vertical jobs' private set intersection (edge_agent/alignment.py): openmined-psi pins
# protobuf==6.30.2 exactly, where onnx needs >=6.31.1; it runs on the newer protobuf, so it is
# installed without its pins (pyproject cannot say "no deps"; docs/vertical.md says why).
psi_version=$(sed -n 's/^openmined-psi==//p' "$here/constraints.txt")
psi_installed=$("$venv/bin/python" -m pip show openmined-psi 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$psi_installed" != "$psi_version" ]; then
    log "installing openmined-psi $psi_version without its protobuf pin"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "openmined-psi==$psi_version"
fi

# KServe's client and ModelServer (tests/integration/test_serving_kserve.py, bench/inference.py)
# in a venv of their own: kserve pins psutil<6 where amqtt needs psutil>=7, and its protobufs
# share a package name with tritonclient's, so the two never load in one process.
kserve_venv=$venv/kserve
kserve_stamp=$kserve_venv/.medsplit-installed
if [ ! -f "$kserve_stamp" ] || [ "$here/constraints-kserve.txt" -nt "$kserve_stamp" ]; then
    log "installing kserve into $kserve_venv with constraints-kserve.txt"
    [ -x "$kserve_venv/bin/python" ] || "$python" -m venv "$kserve_venv"
    "$kserve_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$here/constraints-kserve.txt" kserve onnxruntime numpy
    touch "$kserve_stamp"
else
    log "kserve venv up to date"
fi

# Debian packages the tests use: Mosquitto (the broker), dicom3tools (dciodvfy checks the DICOM
# that `medsplit dicom-synth` writes), Orthanc and its DICOMweb plugin (a real PACS), Chromium
# and its driver (the status page is tested in a real headless browser).
apt_install() {
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
        log "installing $* from Debian's packages"
        $sudo apt-get update -qq
        # A package's init script may try to start a system broker; the tests never use it.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        log "WARNING: $* not installed and apt-get is unavailable; install by hand"
    fi
}

find_mosquitto() {
    command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

missing=""
if [ -z "$(find_mosquitto)" ]; then missing="mosquitto"; fi
if ! command -v dciodvfy >/dev/null 2>&1; then missing="$missing dicom3tools"; fi
# Orthanc with its DICOMweb plugin: the PACS the DICOMweb tests and benchmark read studies from.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
    missing="$missing orthanc orthanc-dicomweb"
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    missing="$missing chromium chromium-driver"
fi
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word a package
    apt_install $missing
fi

m=$(find_mosquitto)
if [ -n "$m" ]; then log "mosquitto: $m"; fi
