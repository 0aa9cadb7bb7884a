#!/usr/bin/env bash
# Start a Docker daemon with no bridge network and no iptables rules (containers then run with --network host
# only), unless a daemon already answers. Prints the new daemon's pid; prints nothing when one was running.
#   scripts/docker_daemon.sh [LOG]          # LOG defaults to /tmp/jetmoe-dockerd.log
# Needs root and dockerd (Debian: apt-get install docker.io).
set -euo pipefail
DOCKER="${DOCKER:-docker}"
LOG="${1:-/tmp/jetmoe-dockerd.log}"
if "$DOCKER" info > /dev/null 2>&1; then
    exit 0
fi
# A pid file left by a daemon that was killed makes dockerd refuse to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2> /dev/null; then
    rm -f /var/run/docker.pid
fi
setsid dockerd --bridge=none --iptables=false > "$LOG" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 120); do
    if "$DOCKER" info > /dev/null 2>&1; then
        echo "$pid"
        exit 0
    fi
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.5
done
echo "dockerd did not start; the end of $LOG:" >&2
tail -20 "$LOG" >&2
exit 1
