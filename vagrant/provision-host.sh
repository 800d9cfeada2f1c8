#!/bin/bash
# Every lab VM, first: a unique identity, openhnv installed from the synced folder, the
# systemd units, and the trunk NICs named and up with the management address on the
# first one (a freshly installed Hyper-V host; the agent moves it onto its switch).
#   provision-host.sh NAME MGMT_ADDRESS/LEN MAC0,MAC1
set -euo pipefail
name=$1 address=$2 macs=$3
src=/vagrant
venv=/opt/openhnv

# --- identity: boxes are clones, so regenerate what must be unique per host (once) ----
if [ ! -e /etc/openhnv/.identity ]; then
    # A cloned machine-id gives every host the same DHCP client id, journal id and
    # systemd-derived MACs: udev's MACAddressPolicy=persistent derives the MAC of every
    # bond and bridge from it, so two hosts' virtual switches would share one MAC and
    # drop each other's frames as their own (the multi-kernel lab showed exactly that).
    # Make a new one, and restart udevd, which read the old one at boot.
    rm -f /etc/machine-id /var/lib/dbus/machine-id
    systemd-machine-id-setup
    ln -sf /etc/machine-id /var/lib/dbus/machine-id 2>/dev/null || true
    systemctl restart systemd-udevd
    # Same for the SSH host keys baked into the box.
    rm -f /etc/ssh/ssh_host_*key*
    dpkg-reconfigure -f noninteractive openssh-server
    systemctl restart ssh || true
    install -d -m 0755 /etc/openhnv
    date -u +%FT%TZ > /etc/openhnv/.identity
fi
hostnamectl set-hostname "$name"

# --- packages and openhnv ----------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
# Every package the provisioning scripts use, installed only when one is missing (a box
# may have some and not others).
# dnsmasq-base and nftables: the agent's DHCP servers for its VMs and their guard.
missing=$(for package in python3-venv python3-pip iproute2 iputils-ping tcpdump curl dnsmasq-base nftables; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || echo "$package"
done)
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -q --no-install-recommends $missing
fi
[ -x $venv/bin/python ] || python3 -m venv $venv
# A copy, not an editable install: the daemons must not depend on the synced folder.
# Hosts without internet access: a wheelhouse in the project directory (made on the
# Vagrant host as docs/operating.md's build-machine step does:
# `python3 -m pip wheel --wheel-dir wheelhouse .`) is used instead of PyPI.
if [ -d "$src/wheelhouse" ]; then
    $venv/bin/pip install -q --upgrade --no-index --find-links "$src/wheelhouse" openhnv
else
    $venv/bin/pip install -q --upgrade "$src"
fi
for cmd in hnv-agent hnv-controller hnvctl; do ln -sf $venv/bin/$cmd /usr/local/bin/$cmd; done

# --- systemd units, modules, users ----------------------------------------------------------
install -m 0644 $src/systemd/hnv-agent.service $src/systemd/hnv-controller.service /etc/systemd/system/
# The lab's tenant VMs are network namespaces the agent makes: the drop-in lets the
# unit mount them (docs/operating.md, "Installing on a host").
install -D -m 0644 $src/systemd/hnv-agent.service.d/lab-namespaces.conf \
    /etc/systemd/system/hnv-agent.service.d/lab-namespaces.conf
install -D -m 0644 $src/systemd/modules-load.d/openhnv.conf /etc/modules-load.d/openhnv.conf
install -D -m 0644 $src/systemd/sysusers.d/openhnv.conf /etc/sysusers.d/openhnv.conf
systemd-sysusers
systemctl restart systemd-modules-load.service
systemctl daemon-reload

# --- trunk NICs: named by MAC, now and at every boot ----------------------------------------
i=0
for mac in ${macs//,/ }; do
    nic=trunk$i
    cat > /etc/systemd/network/10-openhnv-$nic.link <<LINK
# openhnv lab: the host's trunk NIC $i (a port of the lab's switch).
[Match]
MACAddress=$mac
[Link]
Name=$nic
LINK
    current=$(ip -o link | awk -v mac="$mac" '$0 ~ "link/ether " mac {sub(":$", "", $2); print $2; exit}')
    if [ -z "$current" ]; then echo "provision-host: no NIC with MAC $mac" >&2; exit 1; fi
    if [ "$current" != "$nic" ]; then
        ip link set dev "$current" down
        ip link set dev "$current" name "$nic"
    fi
    ip link set dev "$nic" up
    i=$((i + 1))
done
# Only until the agent has built the team and switch: it then holds the address on the
# switch (and restores it from its saved state after a reboot), so nothing here persists.
if [ ! -e /var/lib/openhnv/agent/state.json ] && ! ip -o addr show | grep -q " ${address%/*}/"; then
    ip addr add "$address" dev trunk0
fi
echo "provision-host: $name ready ($(ip -br addr show dev trunk0 2>/dev/null || echo 'trunk0 in the team'))"
