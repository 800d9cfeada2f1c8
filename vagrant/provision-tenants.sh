#!/bin/bash
# The walkthrough's tenant deployment: Fabrikam2 and Fabrikam3 (same CA space, on
# purpose) and one VM of each on every VIRTUALCLUSTER host, then the view of the leases.
#   vagrant provision CON-HyperV1 --provision-with tenants
set -euo pipefail
table=$1
src=/vagrant
/opt/openhnv/bin/python "$src/vagrant/lab_fabric.py" tenants --hosts "$table" > /etc/openhnv/tenants.yaml
. /etc/openhnv/controller.env
export HNV_CONTROLLER="https://$HNV_LISTEN" HNV_TOKEN_FILE=/root/.hnv-admin.token HNV_CA_FILE=/etc/openhnv/controller-ca.crt
hnvctl apply -f /etc/openhnv/fabric.yaml -f /etc/openhnv/tenants.yaml
hnvctl hosts
hnvctl ip list
echo "provision-tenants: ping across hosts, e.g. on CON-HyperV6: sudo ip netns exec TenantVM01 ping <TenantVM02's CA>"
