#!/bin/bash
# Every host (the management node too): its token and the controller's CA certificate
# from the controller's provisioning, the agent's env file, and the agent service enabled
# and started.
#   provision-agent.sh NAME CONTROLLER_URL METRICS_ADDRESS:PORT
set -euo pipefail
name=$1 controller=$2 metrics=$3
token=/vagrant/.vagrant/openhnv/tokens/$name.token
ca=/vagrant/.vagrant/openhnv/controller-ca.crt

# The management node mints the tokens; with a parallel provider it may still be busy.
for _ in $(seq 600); do [ -s "$token" ] && [ -s "$ca" ] && break; sleep 1; done
[ -s "$token" ] || { echo "provision-agent: no token for $name at $token after 600 s: provision CON-HyperV1 first" >&2; exit 1; }
[ -s "$ca" ] || { echo "provision-agent: no controller CA at $ca after 600 s: provision CON-HyperV1 first" >&2; exit 1; }
install -d -m 0755 /etc/openhnv
install -m 0600 "$token" /etc/openhnv/agent.token
install -m 0644 "$ca" /etc/openhnv/controller-ca.crt
cat > /etc/openhnv/agent.env <<ENV
# Written by vagrant/provision-agent.sh (see systemd/agent.env.example).
HNV_CONTROLLER_URL=$controller
HNV_CA_FILE=/etc/openhnv/controller-ca.crt
HNV_HOST=$name
HNV_METRICS_ADDRESS=$metrics
ENV
systemctl enable --now hnv-agent.service
# restart, not start: a re-provision picks up a new token or address. The data plane
# stays as it is across the restart (no clean-up on stop).
systemctl restart hnv-agent.service
echo "provision-agent: $name follows $controller; metrics on http://$metrics/metrics"
