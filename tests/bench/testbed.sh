# The LAN testbed the benchmark scripts share (sourced, root): a bridge in a
# namespace of its own and one namespace per host plugged into it, with a
# route for multicast so that mDNS works. Namespaces are named from ID and
# removed (their processes killed) by testbed_down.
#
#   testbed_up ID          # the switch; then `attach NS IP PORT` per host
#   linked_pair ID NET     # or just two namespaces, ID-o (NET.1) and ID-n
#                          # (NET.2), joined by one veth pair ID-a / ID-b
#   in_ns NS CMD...        # run CMD inside NS
#   caching_proxy NS DIR LISTEN UPSTREAM   # nginx proxy_cache (lock on) in NS
#   testbed_down           # kill every process in, and delete, every namespace

testbed_up() {
  tb_namespaces=("$1-sw")
  tb_switch="$1-sw"
  ip netns add "$tb_switch"
  ip -n "$tb_switch" link add br0 type bridge
  ip -n "$tb_switch" link set br0 up
}

attach() { # NS IP PORT
  ip netns add "$1"
  tb_namespaces+=("$1")
  ip link add eth0 netns "$1" type veth peer name "$3" netns "$tb_switch"
  ip -n "$tb_switch" link set "$3" master br0
  ip -n "$tb_switch" link set "$3" up
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" link set lo up
  ip -n "$1" route add 224.0.0.0/4 dev eth0
}

linked_pair() { # ID NET
  tb_namespaces+=("$1-o" "$1-n")
  ip netns add "$1-o"
  ip netns add "$1-n"
  ip link add "$1-a" type veth peer name "$1-b"
  ip link set "$1-a" netns "$1-o"
  ip link set "$1-b" netns "$1-n"
  ip -n "$1-o" addr add "$2.1/24" dev "$1-a"
  ip -n "$1-n" addr add "$2.2/24" dev "$1-b"
  for ns in "$1-o" "$1-n"; do ip -n "$ns" link set lo up; done
  ip -n "$1-o" link set "$1-a" up
  ip -n "$1-n" link set "$1-b" up
}

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

testbed_down() {
  for ns in "${tb_namespaces[@]:-}"; do
    [ -n "$ns" ] || continue
    for p in $(ip netns pids "$ns" 2> /dev/null); do kill -9 "$p" 2> /dev/null || true; done
    ip netns del "$ns" 2> /dev/null || true
  done
}

# A site caching proxy as an operator would set one up: nginx proxy_cache
# with the cache lock on (one request upstream per file), running in NS
# from DIR, listening on LISTEN (ip:port), caching UPSTREAM (a base URL).
caching_proxy() { # NS DIR LISTEN UPSTREAM
  mkdir -p "$2/cache" "$2/tmp"
  cat > "$2/nginx.conf" << EOF
daemon off;
user root;
worker_processes 2;
pid $2/nginx.pid;
error_log $2/error.log;
events { worker_connections 256; }
http {
  access_log off;
  proxy_temp_path $2/tmp;
  client_body_temp_path $2/tmp;
  proxy_cache_path $2/cache keys_zone=site:10m max_size=4g inactive=1h use_temp_path=off;
  server {
    listen $3;
    location / {
      proxy_pass $4;
      proxy_cache site;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_age 600s;
      proxy_cache_lock_timeout 600s;
    }
  }
}
EOF
  in_ns "$1" nginx -p "$2" -c "$2/nginx.conf" &
}
