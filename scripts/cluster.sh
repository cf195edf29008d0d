#!/usr/bin/env bash
# A whole streamd cluster on loopback: 3 NATS nodes (JetStream + MQTT, deploy/nats/node.conf),
# 2 streamd nodes publishing to them (mqtt.hosts, journal, drain on SIGTERM) and HAProxy
# in front (deploy/haproxy/haproxy.cfg). See docs/scale-out.md.
#
#   scripts/cluster.sh up      # start everything, wait until it serves, print the endpoints
#   scripts/cluster.sh down    # SIGTERM everything (streamd drains), SIGKILL what hangs
#   scripts/cluster.sh status  # which processes run
#
# Environment: CLUSTER_DIR (default .cluster: pid files, logs, NATS stores, journals),
# CLUSTER_PORT (default 18700: HAProxy; streamd nodes +1, +2; NATS MQTT +31..+33, client
# +11..+13, routes +21..+23, monitoring +41..+43; HAProxy stats +50; streamd agent-check
# +61, +62, HTTP port (POST /v1/audio/...) +71, +72), CLUSTER_PIPELINE
# (the nodes' `--pipeline`; default: the daemon's, whisper with tiny.en; "echo": no
# model, text = segment duration), PYTHON (default
# .venv/bin/python), STREAMD_ARGS (more `streamd serve` flags).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$(realpath -m "${CLUSTER_DIR:-$repo/.cluster}")"
base="${CLUSTER_PORT:-18700}"
python="${PYTHON:-$repo/.venv/bin/python}"
nats_server="$(command -v nats-server || echo /usr/sbin/nats-server)"
haproxy="$(command -v haproxy || echo /usr/sbin/haproxy)"

nats_mqtt() { echo $((base + 30 + $1)); }

# start NAME LOGFILE [ENV=VALUE...] -- COMMAND...: in the background, in its own session.
start() {
  local name="$1" log="$2"; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" setsid "$@" </dev/null >>"$log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

# wait_for WHAT TIMEOUT_S COMMAND...: until COMMAND succeeds.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "cluster: $what not up in ${timeout}s; logs in $dir" >&2
      return 1
    fi
    sleep 0.3
  done
}

http_status() {  # URL EXPECTED_STATUS
  "$python" -c 'import sys, urllib.request
try:
    code = urllib.request.urlopen(sys.argv[1], timeout=2).status
except Exception as exc:
    code = getattr(exc, "code", 0)
sys.exit(code != int(sys.argv[2]))' "$1" "$2"
}

max_sessions() {  # HEALTHZ_URL: the node's server.max_sessions, as its /healthz shows it
  "$python" -c 'import json, sys, urllib.request
print(int(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))["max_sessions"]))' "$1"
}

mqtt_ready() {  # PORT: the node answers an MQTT CONNECT (JetStream is up)
  "$python" -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.settimeout(5)
s.sendall(bytes([0x10, 17, 0, 4, *b"MQTT", 4, 2, 0, 10, 0, 5, *b"probe"]))
sys.exit(s.recv(4) != bytes([0x20, 2, 0, 0]))' "$1"
}

up() {
  if [ -n "$(running)" ]; then
    echo "cluster: already running ($dir); scripts/cluster.sh down first" >&2
    exit 1
  fi
  [ -x "$nats_server" ] && [ -x "$haproxy" ] || {
    echo "cluster: needs nats-server and haproxy (scripts/install-system-deps.sh)" >&2; exit 1; }
  mkdir -p "$dir"
  local routes=() i
  for i in 1 2 3; do routes+=("NATS_ROUTE_$i=nats-route://127.0.0.1:$((base + 20 + i))"); done
  for i in 1 2 3; do
    start "nats-$i" "$dir/nats-$i.log" NATS_NAME="nats-$i" \
      NATS_LISTEN="127.0.0.1:$((base + 10 + i))" NATS_HTTP="127.0.0.1:$((base + 40 + i))" \
      NATS_STORE_DIR="$dir/nats-$i" NATS_CLUSTER_LISTEN="127.0.0.1:$((base + 20 + i))" \
      NATS_MQTT_LISTEN="127.0.0.1:$(nats_mqtt $i)" "${routes[@]}" \
      -- "$nats_server" -c "$repo/deploy/nats/node.conf"
  done
  for i in 1 2 3; do wait_for "nats-$i MQTT" 60 mqtt_ready "$(nats_mqtt $i)"; done

  local pipeline_env=()
  if [ -n "${CLUSTER_PIPELINE:-}" ]; then
    pipeline_env=(STREAMD_RECOGNITION_PIPELINE="$CLUSTER_PIPELINE")
  fi
  for i in 1 2; do
    # node1 publishes to nats-1 first, node2 to nats-2; both fall back on the others.
    local first=$i others=()
    for j in 1 2 3; do [ $j = $i ] || others+=("127.0.0.1:$(nats_mqtt $j)"); done
    mkdir -p "$dir/node$i"
    start "node$i" "$dir/node$i.log" STATE_DIRECTORY="$dir/node$i" \
      STREAMD_SERVER_DRAIN_TIMEOUT_S="${STREAMD_SERVER_DRAIN_TIMEOUT_S:-60}" \
      JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$repo/.cache/jax}" \
      "${pipeline_env[@]}" \
      -- "$python" -m streamd.cli serve --node "node$i" --port $((base + i)) \
         --http-port $((base + 70 + i)) --agent-port $((base + 60 + i)) \
         --mqtt-host 127.0.0.1 --mqtt-port "$(nats_mqtt $first)" \
         --mqtt-hosts "$(IFS=,; echo "${others[*]}")" --log-format text ${STREAMD_ARGS:-}
  done
  for i in 1 2; do
    wait_for "streamd node$i" 900 http_status "http://127.0.0.1:$((base + i))/healthz" 200
  done

  # Each node's maxconn in HAProxy is its max_sessions (docs/scale-out.md, *Overload*).
  local max1 max2
  max1="$(max_sessions "http://127.0.0.1:$((base + 1))/healthz")"
  max2="$(max_sessions "http://127.0.0.1:$((base + 2))/healthz")"
  sed -e "s|bind 127.0.0.1:8080|bind 127.0.0.1:$base|" \
      -e "s|bind 127.0.0.1:8404|bind 127.0.0.1:$((base + 50))|" \
      -e "s|127.0.0.1:8765|127.0.0.1:$((base + 1)) maxconn $max1|" \
      -e "s|127.0.0.1:8766|127.0.0.1:$((base + 2)) maxconn $max2|" \
      -e "s|agent-port 8785|agent-port $((base + 61))|" \
      -e "s|agent-port 8786|agent-port $((base + 62))|" \
      -e "s|127.0.0.1:8775 check port 8765|127.0.0.1:$((base + 71)) check port $((base + 1))|" \
      -e "s|127.0.0.1:8776 check port 8766|127.0.0.1:$((base + 72)) check port $((base + 2))|" \
      "$repo/deploy/haproxy/haproxy.cfg" >"$dir/haproxy.cfg"
  start haproxy "$dir/haproxy.log" -- "$haproxy" -db -f "$dir/haproxy.cfg"
  wait_for "haproxy" 30 http_status "http://127.0.0.1:$base/healthz" 200

  cat <<EOT
streamd cluster up (logs, pids, stores: $dir)
  WebSocket    ws://127.0.0.1:$base/v1/stream   (HAProxy, leastconn over 2 nodes)
  HTTP         http://127.0.0.1:$base/  /healthz  /metrics  POST /v1/audio/transcriptions
  HAProxy      http://127.0.0.1:$((base + 50))/stats
  streamd      node1 http://127.0.0.1:$((base + 1))   node2 http://127.0.0.1:$((base + 2))
  NATS MQTT    127.0.0.1:$(nats_mqtt 1)  127.0.0.1:$(nats_mqtt 2)  127.0.0.1:$(nats_mqtt 3)
  NATS monitor http://127.0.0.1:$((base + 41))/jsz (and +42, +43)
Try:  .venv/bin/streamd-stream --url ws://127.0.0.1:$base/v1/stream streamd/data/jfk.wav
      .venv/bin/streamd-listen --host 127.0.0.1 --port $(nats_mqtt 3)
      kill -9 the streamd node holding a session (pids in $dir): the client resumes
      on the other (docs/scale-out.md, "Clients resume on another node")
Stop: make cluster-down
EOT
}

running() {
  local f
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then basename "$f" .pid; fi
  done
}

down() {
  local name pid deadline
  # The load balancer first, then the daemons (they drain and flush to NATS), NATS last.
  for name in haproxy node1 node2 nats-1 nats-2 nats-3; do
    [ -e "$dir/$name.pid" ] || continue
    pid="$(cat "$dir/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      deadline=$((SECONDS + 90))
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "cluster: $name did not stop; SIGKILL" >&2
        kill -KILL "$pid"
      fi
    fi
    rm -f "$dir/$name.pid"
  done
  echo "cluster down (logs kept in $dir)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) running ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
