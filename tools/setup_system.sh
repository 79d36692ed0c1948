#!/usr/bin/env bash
# System packages for multi-node launches (pdsh over ssh, OpenMPI) and the two-host tests.
# One source of truth: `make setup`, .ci/run and the Dockerfiles all run this script.
# Installs only what is missing; without root or apt-get it prints what to install and carries on
# (single-node training needs none of these).
set -euo pipefail
packages=(openssh-server openssh-client pdsh openmpi-bin libopenmpi-dev iproute2 procps)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup_system: not installing ${missing[*]} (needs root and apt-get); multi-node launches and their tests need them" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
