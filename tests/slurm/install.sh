#!/usr/bin/env bash
# Install Debian's Slurm (controller, node daemon, client, accounting daemon), munge and
# MariaDB for the single-machine test cluster. Idempotent: a fast no-op when all are present.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for a fully configured package.
    if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: packages missing (${missing[*]}) and not root; run as root" >&2
    exit 1
fi

echo "install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# No systemd and no init scripts should start daemons during install: policy-rc.d exit 101
# tells invoke-rc.d "not allowed", so start.sh alone decides what runs.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap 'if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi' EXIT

# Another apt on the machine (a second test session, a system job) may hold apt's locks; wait
# for it rather than fail (seen here: "Could not get lock /var/lib/apt/lists/lock").
apt_waiting() {
    local out
    for _ in $(seq 120); do
        if out=$("$@" 2>&1); then printf '%s\n' "$out"; return 0; fi
        if ! grep -q "Could not get lock" <<<"$out"; then printf '%s\n' "$out" >&2; return 1; fi
        echo "install.sh: apt is busy, waiting" >&2
        sleep 5
    done
    printf '%s\n' "$out" >&2
    return 1
}
apt_waiting apt-get -o DPkg::Lock::Timeout=600 update -q
apt_waiting apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${PACKAGES[@]}"
