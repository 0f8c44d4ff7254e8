#!/usr/bin/env bash
# CPU per small request of one build's daemons at a fixed request count,
# for comparing two builds on a noisy machine (run them alternately):
#   bench/cpu.sh DIR h1|h2c [N]
# DIR holds tunnel-server and tunnel-client. nginx serves a 100-byte file on
# 127.0.0.1:18081, the tunnel (worker_threads = 1, access log on) listens on
# 127.0.0.1:18080; h2load sends 20000 warm-up requests, then N (default
# 100000) over 64 connections. Prints each daemon's user + system time per
# request, read from /proc before and after. Needs nginx, h2load and curl
# (bench/setup.sh --no-rathole).
set -euo pipefail
dir=${1:?usage: bench/cpu.sh DIR h1|h2c [N]}
proto=${2:?usage: bench/cpu.sh DIR h1|h2c [N]}
n=${3:-100000}
case $proto in
    h1) flags=(--h1) ;;
    h2c) flags=(-m 1) ;;
    *) echo "protocol must be h1 or h2c" >&2; exit 2 ;;
esac
nginx=$(command -v nginx || echo /usr/sbin/nginx)
work=$(mktemp -d)
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/www" "$work/tmp"
head -c 100 /dev/zero | tr '\0' x > "$work/www/small.txt"
cat > "$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    fastcgi_temp_path $work/tmp;
    uwsgi_temp_path $work/tmp;
    scgi_temp_path $work/tmp;
    types { }
    default_type application/octet-stream;
    server { listen 127.0.0.1:18081; root $work/www; }
}
EOF
cat > "$work/server.toml" <<'EOF'
[server]
http_listen = "127.0.0.1:18080"
grpc_listen = "127.0.0.1:17000"
admin_listen = "127.0.0.1:17001"
worker_threads = 1
[[groups]]
name = "bench"
token = "bench-token"
[[rules]]
group = "bench"
upstream = "web"
EOF
cat > "$work/client.toml" <<'EOF'
server = "http://127.0.0.1:17000"
client_id = "bench"
group = "bench"
token = "bench-token"
worker_threads = 1
[upstreams]
web = "http://127.0.0.1:18081"
EOF
"$nginx" -c "$work/nginx.conf" & pids+=($!)
"$dir/tunnel-server" --config "$work/server.toml" > "$work/server.log" 2>&1 & server=$!; pids+=($server)
sleep 0.5
"$dir/tunnel-client" --config "$work/client.toml" > "$work/client.log" 2>&1 & client=$!; pids+=($client)
ready=
for _ in $(seq 1 100); do
    if curl -sf -o /dev/null http://127.0.0.1:18080/small.txt; then ready=1; break; fi
    sleep 0.2
done
[ -n "$ready" ] || { echo "the tunnel did not answer within 20 s (logs in $work)" >&2; exit 1; }
url=http://127.0.0.1:18080/small.txt
h2load "${flags[@]}" -n 20000 -c 64 -t 2 "$url" > /dev/null
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
s0=$(cpu "$server"); c0=$(cpu "$client")
out=$(h2load "${flags[@]}" -n "$n" -c 64 -t 2 "$url")
s1=$(cpu "$server"); c1=$(cpu "$client")
grep -E "^status codes" <<< "$out"
per() { awk -v t="$1" -v hz="$ticks" -v n="$n" 'BEGIN { printf "%.1f", t * 1000000 / hz / n }'; }
echo "$dir $proto: server $(per $((s1 - s0))) µs, client $(per $((c1 - c0))) µs, both $(per $((s1 - s0 + c1 - c0))) µs per request"
