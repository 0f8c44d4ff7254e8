#!/usr/bin/env bash
# Installs what tunnel-bench drives: nginx (the upstream), wrk and h2load
# (load generators), curl (transfers), nftables and iproute2 (the lossy-link
# cell's network namespace), haproxy (the load balancer in front of several
# servers), etcd (the cluster bench's store), and rathole (the race's anchor).
#   bench/setup.sh               everything
#   bench/setup.sh --no-rathole  the Debian packages only (what CI needs for --quick)
set -euo pipefail
want=()
for tool in nginx:nginx wrk:wrk h2load:nghttp2-client curl:curl nft:nftables ip:iproute2 haproxy:haproxy etcd:etcd-server; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || want+=("${tool#*:}")
done
if [ ${#want[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing ${want[*]} and apt-get is not available: install them by hand" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}"
fi
if [ "${1:-}" != "--no-rathole" ] && ! command -v rathole >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/rathole" ]; then
    # rathole's default features no longer build on current Rust.
    cargo install --locked rathole --no-default-features --features server,client \
        || cargo install rathole --no-default-features --features server,client
fi
