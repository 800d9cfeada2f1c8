#!/bin/bash
# The management node: the controller's store, tokens, CA and server certificate (for
# its management address), the controller service (HTTPS), and the seed fabric applied
# for the hosts Vagrant made. The host tokens are left in the synced folder
# (.vagrant/openhnv/tokens, mode 0600) for the hosts' provisioning, with the CA
# certificate (.vagrant/openhnv/controller-ca.crt, public) the agents verify it with.
#   provision-controller.sh HOST_TABLE LISTEN_ADDRESS:PORT
set -euo pipefail
table=$1 listen=$2
src=/vagrant
state=/var/lib/openhnv/controller
tokens=$src/.vagrant/openhnv/tokens

hosts=()
for entry in ${table//,/ }; do hosts+=(--host "${entry%%=*}"); done
# The parent stays root's and 0755: the agent (root, but without CAP_DAC_OVERRIDE) has
# its own state directory beside the controller's on a host that runs both.
install -d -m 0755 /var/lib/openhnv
install -d -o openhnv -g openhnv -m 0700 "$state"
# init keeps an existing admin token and mints the missing host tokens: safe to re-run.
# It also creates the CA and the server certificate once (an existing one is kept).
runuser -u openhnv -- /opt/openhnv/bin/hnv-controller init --state-dir "$state" "${hosts[@]}" \
    --tls-address "${listen%:*}" --tls-address 127.0.0.1 --tls-name localhost
install -d -m 0755 /etc/openhnv
install -m 0644 "$state/tls/ca.crt" /etc/openhnv/controller-ca.crt

cat > /etc/openhnv/controller.env <<ENV
# Written by vagrant/provision-controller.sh (see systemd/controller.env.example).
HNV_LISTEN=$listen
ENV
systemctl enable --now hnv-controller.service
systemctl restart hnv-controller.service
for _ in $(seq 60); do
    curl -fsS --cacert /etc/openhnv/controller-ca.crt "https://$listen/healthz" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS --cacert /etc/openhnv/controller-ca.crt "https://$listen/healthz" >/dev/null \
    || { journalctl -u hnv-controller -n 30 --no-pager; exit 1; }

install -d -m 0700 "$tokens"
for entry in ${table//,/ }; do
    host=${entry%%=*}
    install -m 0600 "$state/hosts/$host.token" "$tokens/$host.token"
done
install -m 0600 "$state/admin.token" /root/.hnv-admin.token
install -m 0644 /etc/openhnv/controller-ca.crt "$src/.vagrant/openhnv/controller-ca.crt"

/opt/openhnv/bin/python "$src/vagrant/lab_fabric.py" fabric --hosts "$table" > /etc/openhnv/fabric.yaml
export HNV_CONTROLLER="https://$listen" HNV_TOKEN_FILE=/root/.hnv-admin.token HNV_CA_FILE=/etc/openhnv/controller-ca.crt
hnvctl apply -f /etc/openhnv/fabric.yaml
echo "provision-controller: controller on https://$listen; hosts: ${table//,/ }"
