# openhnv entry points. Every public target does its own set-up on a fresh Debian 12
# machine (run as root): the Debian packages the kernel tier and the lab need, then a
# virtualenv in .venv with the project installed editable. Both steps are skipped cheaply
# when already done, so a second `make test` goes straight to the tests.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Touched after a successful `pip install`; pip runs again only when pyproject.toml is newer.
STAMP := $(VENV)/.openhnv-installed

# Let Python and pytest cache bytecode and rewritten test modules in the checkout even if
# the caller's environment forbids it: it saves a second or more of CPU per run, and the
# kernel tier's VM (where the tree is read-only) reads the same caches.
unexport PYTHONDONTWRITEBYTECODE

# Debian packages: python3-venv/pip build .venv; qemu + linux-image-amd64 + busybox are what
# virtme-ng boots for the kernel tier; iproute2, iputils-ping, tcpdump, kmod and procps are
# used by the tests and the lab inside and outside the VM; systemd (systemd-analyze) and
# vagrant (+ vagrant-libvirt, whose settings validate checks) check the unit files and the
# Vagrantfile; iperf3 is bench/datapath's load; prometheus gives promtool (the alert rules'
# unit tests) and the server `hnv-lab up --prometheus` runs in the lab (on a host booted
# with systemd the package also enables its own prometheus.service on :9090).
# mmdebstrap builds the system tier's host image (netns_lab.hostimage) from Debian's
# packages; e2fsprogs makes it a disk.
# postgresql is the shared store of controller replicas (the pg tier starts throw-away
# clusters with its initdb/pg_ctl); libpq5 is the client library psycopg loads, and
# libpq-dev, gcc and python3-dev build psycopg's C implementation against it.
# clang/llvm compile flow mode's eBPF program (agent/bpf) against libbpf-dev's headers;
# the agent loads it and writes its maps with bpftool.
# Append here; keep one list.
DEB_PACKAGES := python3 python3-venv python3-pip \
	qemu-system-x86 linux-image-amd64 busybox-static kmod udev \
	iproute2 iputils-ping tcpdump procps util-linux nftables \
	systemd vagrant vagrant-libvirt graphviz iperf3 ethtool \
	prometheus mmdebstrap e2fsprogs \
	postgresql libpq5 libpq-dev gcc python3-dev \
	dnsmasq-base \
	clang llvm libbpf-dev bpftool

# The vagrant tier only (`make vagrant`, not part of `make test`): libvirt's daemon for
# vagrant-libvirt, and qemu-img for the box made from the host image.
VAGRANT_DEB_PACKAGES := libvirt-daemon-system libvirt-clients qemu-utils dnsmasq-base

.PHONY: help setup debs venv bpf test unit netns pg kernel multikernel system vagrant vagrant-debs demo bench features clean

help:
	@echo "make demo     set up, then run the lab walkthrough"
	@echo "make test     set up, then run the unit, netns, pg, kernel and multikernel tiers"
	@echo "make bench    set up, then run the benchmarks"
	@echo "make unit | netns | pg | kernel | multikernel | system | vagrant   one tier only (after set-up)"
	@echo "make features show which kernel features the running kernel has"
	@echo "make bpf      compile flow mode's eBPF programs (part of setup)"

setup: debs venv bpf

# Flow mode's tc programs (agent/flowmode.py loads the object). -g: libbpf needs the BTF
# of the .maps section.
BPF_OBJECTS := agent/bpf/hnv_flow.o
bpf: $(BPF_OBJECTS)
agent/bpf/%.o: agent/bpf/%.c | debs
	clang -O2 -g -target bpf -I/usr/include/$$(uname -m)-linux-gnu -Wall -c $< -o $@

# One dpkg-query for all packages (a few ms); apt-get runs only when something is missing.
# dpkg-query prints a line per known package ("name install ok installed"); unknown ones
# only on stderr, so they end up in the missing list too.
debs vagrant-debs:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
		echo "setup: not a Debian system; install by hand: $(DEB_PACKAGES)"; exit 0; \
	fi; \
	missing=$$(printf '%s\n' $(DEB_PACKAGES) | grep -vxF -f <( \
		dpkg-query -W -f='$${Package} $${Status}\n' $(DEB_PACKAGES) 2>/dev/null \
		| awk '$$NF == "installed" { print $$1 }') | tr '\n' ' '); \
	if [ -z "$${missing// /}" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
		echo "setup: missing Debian packages: $$missing"; \
		echo "setup: run as root, or: sudo apt-get install -y --no-install-recommends $$missing"; \
		exit 1; \
	fi; \
	echo "setup: installing Debian packages: $$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends $$missing

venv: $(STAMP)

# Order-only on debs: python3-venv must exist before the venv, but a run of the (phony)
# debs target must not force a reinstall.
$(STAMP): pyproject.toml | debs
	@test -x $(PY) || { echo "setup: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

test: setup
	$(PY) -m tests.run_tiers unit netns pg kernel multikernel

unit netns pg kernel multikernel system: setup
	$(PY) -m tests.run_tiers $@

vagrant: setup
	@$(MAKE) --no-print-directory vagrant-debs DEB_PACKAGES="$(VAGRANT_DEB_PACKAGES)"
	$(PY) -m tests.run_tiers $@

features: venv
	$(PY) -m netns_lab.features

# The seed walkthrough in the namespace lab (`hnv-lab demo`); hnv-lab runs it inside a
# throw-away VM when this kernel lacks what the lab needs.
demo: setup
	$(VENV)/bin/hnv-lab demo

bench: setup
	$(PY) -m bench $(BENCH)

clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
