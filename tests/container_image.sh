#!/usr/bin/env bash
# Builds the container image from the Dockerfile with Debian's podman (no Docker engine runs here) on a base made with
# debootstrap (the clean-chroot build's cached Debian 12 minbase when there is one), then runs the built image the way
# this machine allows (`podman run` fails here on setrlimit): its filesystem through `podman image mount`, booted with
# systemd-nspawn as the image's user, configured from the environment alone, against the local server on loopback.
# Checks that it streams to NDJSON, answers /health, runs its own HEALTHCHECK command and stops cleanly on SIGTERM.
# Needs root and apt. Usage: tests/container_image.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/polygon-image.XXXXXX)
CACHE=${POLYGON_CHROOT_CACHE:-/var/cache/polygon-streamer-build}
IMAGE=localhost/polygon-streamer:test
BASE_IMAGE=localhost/debian:bookworm-slim
PIDS=()
MOUNTED=""
step() { echo "container_image: $*"; }
fail() { echo "container_image: FAIL: $*" >&2; exit 1; }
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$MOUNTED" ] && podman image unmount "$IMAGE" > /dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || fail "needs root (podman, systemd-nspawn)"
export DEBIAN_FRONTEND=noninteractive

step "installing podman and systemd-nspawn"
apt-get install -y -qq --no-install-recommends podman systemd-container debootstrap > "$WORK/apt.log" 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends podman systemd-container debootstrap \
        > "$WORK/apt.log" 2>&1; } || { tail -20 "$WORK/apt.log"; fail "apt-get install"; }

step "the base image: a Debian 12 rootfs imported into podman"
BASE_TAR="$CACHE/bookworm-minbase.tar"  # the clean-chroot build's, when it ran first
if [ ! -f "$BASE_TAR" ]; then
    BASE_TAR="$CACHE/bookworm-image-base.tar"
    if [ ! -f "$BASE_TAR" ] || [ -z "$(find "$BASE_TAR" -mtime -7)" ]; then
        mkdir -p "$WORK/rootfs" "$CACHE"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
            > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
        tar -C "$WORK/rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    fi
fi
podman import "$BASE_TAR" "$BASE_IMAGE" > /dev/null

step "podman build (chroot isolation, host network for apt)"
git -C "$ROOT" archive HEAD | tar -x -C "$WORK" --one-top-level=src
# (--format docker: the OCI image format has no HEALTHCHECK)
podman build --format docker --isolation=chroot --network=host --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" \
    "$WORK/src" \
    > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "podman build"; }
config=$(podman image inspect "$IMAGE" --format '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}')
step "image config: $config"
[[ "$config" == 'polygon-streamer ["/usr/bin/polygon-streamer"] ["run"]' ]] || fail "user, entrypoint or command"
healthcheck=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck.Test}}')
[[ "$healthcheck" == *"/health"* ]] || fail "no HEALTHCHECK on /health: $healthcheck"

MOUNT=$(podman image mount "$IMAGE")
MOUNTED=yes
cache=$(du -sk "$MOUNT/var/cache/apt" "$MOUNT/var/lib/apt/lists" 2> /dev/null | awk '{s += $1} END {print s + 0}')
[ "$cache" -lt 1024 ] || fail "the image keeps ${cache} KiB of apt cache"
step "image: $(du -sm "$MOUNT" | cut -f1) MB, apt cache ${cache} KiB"
step "the local Polygon server on loopback, from the image itself (a clean checkout has no .venv)"
PY=python3  # the host's, for the standard library only
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
chroot "$MOUNT" /usr/bin/polygon-streamer mock-server --port 0 --key image-key --rate 2000 --batch 5 \
    > "$WORK/server.out" 2> "$WORK/server.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^ws://' "$WORK/server.out" && break; sleep 0.1; done
grep -q '^ws://' "$WORK/server.out" || { tail -5 "$WORK/server.err"; fail "the local server did not start"; }
URL=$(head -1 "$WORK/server.out")
METRICS=$(free_port)

step "running the image with systemd-nspawn, configured from the environment alone"
mkdir -p "$WORK/data"
chown 10001:10001 "$WORK/data"
env_args=()
for setting in "POLYGON_API_KEY=image-key" "POLYGON_WS_URL=$URL/stocks" "SUBSCRIPTION=T.*,Q.*" "SINK=ndjson" \
               "NDJSON_DEST=/data/stocks.ndjson" "NDJSON_FLUSH_INTERVAL_MS=100" "METRICS_ADDR=127.0.0.1:$METRICS"; do
    env_args+=("--setenv=$setting")
done
systemd-nspawn -D "$MOUNT" --register=no --keep-unit --quiet --console=pipe --read-only --bind="$WORK/data:/data" \
    --user=polygon-streamer --chdir=/data --kill-signal=SIGTERM "${env_args[@]}" /usr/bin/polygon-streamer run \
    > "$WORK/run.out" 2> "$WORK/run.err" &
NSPAWN=$!
PIDS+=($NSPAWN)
health() { "$PY" -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$METRICS/health', timeout=2).status == 200 else 1)" 2> /dev/null; }
lines() { [ -f "$WORK/data/stocks.ndjson" ] && wc -l < "$WORK/data/stocks.ndjson" || echo 0; }
deadline=$((SECONDS + 60))
until health && [ "$(lines)" -ge 500 ]; do
    [ $SECONDS -lt $deadline ] || { tail -5 "$WORK/run.err"; fail "no /health 200 and 500 lines within 60 s"; }
    kill -0 "$NSPAWN" 2> /dev/null || { tail -5 "$WORK/run.err"; fail "the container exited"; }
    sleep 0.2
done
step "streaming: $(lines) lines in /data/stocks.ndjson, /health 200"
[ "$(stat -c %u "$WORK/data/stocks.ndjson")" = 10001 ] || fail "the file is not the image user's"

step "the image's own HEALTHCHECK command, inside the image"
check=$(podman image inspect "$IMAGE" --format '{{range $i, $a := .Config.Healthcheck.Test}}{{if $i}}{{printf "%s\x00" $a}}{{end}}{{end}}' \
    | xargs -0 printf '%q ' )
# (chroot: the running container holds systemd-nspawn's lock on the image's tree)
env -i PATH=/usr/bin:/bin "METRICS_ADDR=127.0.0.1:$METRICS" /usr/sbin/chroot --userspec=10001:10001 "$MOUNT" /bin/sh -c "$check" \
    > "$WORK/check.log" 2>&1 \
    || { cat "$WORK/check.log"; fail "the HEALTHCHECK command failed against a healthy service"; }

step "SIGTERM: drain, flush, exit 0"
kill -TERM "$NSPAWN"
code=0
wait "$NSPAWN" || code=$?
[ "$code" = 0 ] || { tail -5 "$WORK/run.err"; fail "exit $code on SIGTERM"; }
grep -q "every accepted event was handed to the sinks and flushed" "$WORK/run.err" || fail "no clean stop line"
"$PY" - "$WORK/data/stocks.ndjson" <<'EOF' || fail "the file is not whole: lost or torn lines"
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().split("\n")
assert lines[-1] == "", "a torn last line"
seqs = [json.loads(line)["seq"] for line in lines[:-1]]
assert seqs == list(range(1, len(seqs) + 1)), "a hole in seq"
print(f"container_image: {len(seqs)} records, seq 1..{len(seqs)} complete")
EOF
step "OK"
