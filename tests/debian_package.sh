#!/usr/bin/env bash
# Builds the .deb in a clean Debian 12 chroot from its own Build-Depends (tests/clean_chroot_build.sh), checks it
# (contents, lintian with no warning), installs it with apt, runs the installed service on Debian's python3, verifies
# the units (and their hardening), rotates a live NDJSON file with the shipped logrotate configuration and its real
# postrotate and proves by seq that no line was lost, checks that the cron job does nothing once the package is
# removed, then purges it and checks that nothing of it is left; then boots it under a real systemd in a container
# (tests/debian_systemd.sh). Needs root and apt (a Debian 12 machine); .ci/run calls it through `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/polygon-deb.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -f /etc/polygon-streamer/pkgtest.env
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "debian_package: FAIL: $*" >&2; exit 1; }
step() { echo "debian_package: $*"; }
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" = 0 ] || fail "needs root (apt-get install, a system user, logrotate su)"

step "installing the tools that check the package"
apt-get update -qq
apt-get install -y -qq --no-install-recommends debootstrap lintian systemd logrotate cron procps util-linux \
    > "$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; fail "apt-get install of the check tools"; }
dpkg -s polygon-streamer > /dev/null 2>&1 && apt-get purge -y -qq polygon-streamer > /dev/null

step "building in a clean Debian 12 chroot"
bash "$ROOT/tests/clean_chroot_build.sh" "$WORK/out" || fail "the clean chroot build"
cp "$WORK/out/build.log" "$WORK/build.log"
VERSION=$(sed -n '1s/^polygon-streamer (\([^)]*\)).*/\1/p' "$ROOT/debian/changelog")
DEB="$WORK/out/polygon-streamer_${VERSION}_all.deb"
[ -f "$DEB" ] || fail "no .deb produced"

step "checking contents and metadata"
dpkg -c "$DEB" | awk '{print $6}' > "$WORK/contents"
for path in ./usr/bin/polygon-streamer ./etc/polygon-streamer/example.env ./etc/polygon-streamer/logrotate.conf \
            ./etc/cron.d/polygon-streamer ./usr/lib/sysusers.d/polygon-streamer.conf \
            ./usr/lib/tmpfiles.d/polygon-streamer.conf ./usr/lib/python3/dist-packages/polygon_streamer/reader.py \
            ./usr/share/man/man1/polygon-streamer.1.gz ./usr/share/doc/polygon-streamer/README.md \
            ./usr/share/doc/polygon-streamer/schema.md ./usr/share/doc/polygon-streamer/schema.json \
            ./usr/share/doc/polygon-streamer/docs/configuration.md ./usr/share/doc/polygon-streamer/docs/operations.md \
            ./usr/share/doc/polygon-streamer/docs/troubleshooting.md ./usr/share/doc/polygon-streamer/docs/debian.md \
            ./usr/lib/python3/dist-packages/polygon_streamer/schema.json \
            ./usr/share/polygon-streamer/alerts.yml ./usr/share/polygon-streamer/dashboard.json; do
    grep -qx "$path" "$WORK/contents" || fail "missing $path"
done
for unit in polygon-streamer.service polygon-streamer@.service polygon-streamer-logrotate.service \
            polygon-streamer-logrotate.timer polygon-streamer-dirs.service; do
    grep -Eqx "\./(usr/)?lib/systemd/system/$unit" "$WORK/contents" || fail "missing unit $unit"
done
! grep -q "site-packages\|\.venv\|/tests/" "$WORK/contents" || fail "the package ships pip or test files"
dpkg-deb -f "$DEB" Depends | grep -q "python3-websocket (>= 1.2.3)" || fail "Depends lacks python3-websocket"
dpkg-deb -f "$DEB" Depends | grep -q "python3-zmq (>= 24.0.1)" || fail "Depends lacks python3-zmq"
dpkg-deb -f "$DEB" Recommends | grep -q "python3-wsproto" || fail "Recommends lacks python3-wsproto"
grep -q "passed" "$WORK/build.log" || fail "the build ran no tests"

step "lintian (no error, no warning)"
lintian --fail-on error,warning "$DEB" > "$WORK/lintian.log" 2>&1 || { cat "$WORK/lintian.log"; fail "lintian"; }
cat "$WORK/lintian.log"

step "installing with apt"
apt-get install -y -qq "$DEB" > "$WORK/install.log" 2>&1 || { tail -20 "$WORK/install.log"; fail "apt install"; }
getent passwd polygon-streamer > /dev/null || fail "no polygon-streamer user"
[ "$(stat -c %U /var/log/polygon-streamer)" = polygon-streamer ] || fail "/var/log/polygon-streamer owner"
[ "$(stat -c %a /etc/cron.d/polygon-streamer)" = 644 ] && [ "$(stat -c %U /etc/cron.d/polygon-streamer)" = root ] \
    || fail "cron.d file must be root-owned 0644 (cron ignores others)"
[ "$(stat -c %a /etc/polygon-streamer/logrotate.conf)" = 644 ] \
    || fail "logrotate ignores group- or world-writable configurations"
[ "$(head -1 /usr/bin/polygon-streamer)" = "#!/usr/bin/python3" ] || fail "/usr/bin/polygon-streamer is not on Debian's python3"
(cd / && /usr/bin/python3 -c "import polygon_streamer, websocket; assert polygon_streamer.__file__.startswith('/usr/lib/python3/dist-packages/'); assert websocket.__file__.startswith('/usr/lib/python3/dist-packages/')") \
    || fail "the installed service does not use Debian's libraries"
(cd / && /usr/bin/polygon-streamer schema | grep -q '^## The gap record') || fail "polygon-streamer schema: the schema is not installed"
for link in $(sed -n 's/^Documentation=//p' /lib/systemd/system/polygon-streamer@.service); do
    case "$link" in file://*) [ -f "${link#file://}" ] || fail "the unit's Documentation= link $link is dead";; esac
done

step "running the installed demo on Debian's python3"
(cd / && timeout 60 /usr/bin/polygon-streamer demo --max-events 25 --rate 500 --metrics-addr 127.0.0.1:0 \
    > "$WORK/demo.out" 2> "$WORK/demo.err") || { cat "$WORK/demo.err"; fail "demo"; }
[ "$(wc -l < "$WORK/demo.out")" = 25 ] || fail "demo printed $(wc -l < "$WORK/demo.out") events, expected 25"

step "verifying the units"
cp /etc/polygon-streamer/example.env /etc/polygon-streamer/pkgtest.env
UNITDIR=$(dirname "$(dpkg -L polygon-streamer | grep 'polygon-streamer@.service$')")
verify() { systemd-analyze verify "$@" 2>&1 | grep -v "^$" || true; }
out=$(verify "$UNITDIR/polygon-streamer@pkgtest.service" "$UNITDIR/polygon-streamer.service")
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify printed warnings"; }
# verify exits 0 on unknown keys: prove this check sees them, then check the keys that matter one by one.
sed 's/^NoNewPrivileges=yes/NoNewPrivilegez=yes/' "$UNITDIR/polygon-streamer@.service" > "$WORK/broken@.service"
[ -n "$(verify "$WORK/broken@pkgtest.service")" ] || fail "the unit check cannot see an unknown key"
UNIT="$UNITDIR/polygon-streamer@.service"
for line in 'ExecStart=/usr/bin/polygon-streamer run' 'ExecReload=/bin/kill -HUP $MAINPID' 'Restart=on-failure' \
            'RestartPreventExitStatus=2' 'User=polygon-streamer' 'EnvironmentFile=/etc/polygon-streamer/%i.env' \
            'NoNewPrivileges=yes' 'ProtectSystem=strict' 'PrivateTmp=yes' 'ReadWritePaths=/var/log/polygon-streamer' \
            'LimitNOFILE=8192' 'Type=notify' 'NotifyAccess=main' 'WatchdogSec=30s' 'StateDirectoryMode=0750' \
            'Requires=polygon-streamer-dirs.service' 'StartLimitBurst=5' \
            'KillMode=mixed' 'PartOf=polygon-streamer.service' 'ReloadPropagatedFrom=polygon-streamer.service'; do
    grep -qxF "$line" "$UNIT" || fail "the template unit lacks: $line"
done
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$UNIT")
[ "${stop:-0}" -gt 10 ] || fail "TimeoutStopSec must exceed SHUTDOWN_TIMEOUT_SECS (10 s)"
grep -qxF 'ExecReload=/bin/true' "$UNITDIR/polygon-streamer.service" || fail "the umbrella unit cannot be reloaded"
! grep -q '^LogsDirectory=' "$UNIT" || fail "LogsDirectory= with User= re-owns the log directory and loses the group adm"
[ "$(stat -c '%a %U %G' /var/log/polygon-streamer)" = "2750 polygon-streamer adm" ] \
    || fail "/var/log/polygon-streamer is $(stat -c '%a %U %G' /var/log/polygon-streamer), not 2750 polygon-streamer adm"
out=$(verify "$UNITDIR/polygon-streamer-logrotate.timer" "$UNITDIR/polygon-streamer-logrotate.service")
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify of the logrotate timer printed warnings"; }
cp "$UNIT" "$WORK/polygon-streamer@stocks.service"
exposure=$(systemd-analyze security --offline=true "$WORK/polygon-streamer@stocks.service" 2>&1 \
    | sed -n 's/.*Overall exposure level for polygon-streamer@stocks.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "systemd-analyze security gave no exposure level"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "the instance unit's exposure is $exposure, above 2.0"
step "instance unit exposure (systemd-analyze security --offline): $exposure"
cp "$UNITDIR/polygon-streamer-logrotate.service" "$WORK/polygon-streamer-logrotate.service"
exposure=$(systemd-analyze security --offline=true "$WORK/polygon-streamer-logrotate.service" 2>&1 \
    | sed -n 's/.*Overall exposure level for polygon-streamer-logrotate.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' \
    || fail "the logrotate service's exposure is ${exposure:-unknown}, above 2.0"
step "logrotate service exposure (systemd-analyze security --offline): $exposure"

step "rotating a live NDJSON file with the shipped logrotate configuration"
EVENTS=24000
PORT=$(/usr/bin/python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
METRICS=$(/usr/bin/python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
/usr/bin/polygon-streamer mock-server --port "$PORT" --key pkgtest-key --rate 3000 --batch 10 --count "$EVENTS" \
    > "$WORK/server.out" 2> /dev/null &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^ws://' "$WORK/server.out" && break; sleep 0.1; done
rm -f /var/log/polygon-streamer/pkgtest.ndjson*
(cd / && exec setpriv --reuid=polygon-streamer --regid=polygon-streamer --init-groups env -i PATH=/usr/bin:/bin \
    POLYGON_API_KEY=pkgtest-key POLYGON_WS_URL="ws://127.0.0.1:$PORT/stocks" POLYGON_CLUSTER=stocks \
    SUBSCRIPTION='T.*,Q.*' SINK=ndjson NDJSON_DEST=/var/log/polygon-streamer/pkgtest.ndjson \
    NDJSON_FLUSH_INTERVAL_MS=100 METRICS_ADDR="127.0.0.1:$METRICS" STATS_INTERVAL_SECS=0 \
    /usr/bin/polygon-streamer run) 2> "$WORK/streamer.err" &
STREAMER=$!
PIDS+=($STREAMER)
written() {
    /usr/bin/python3 - "$METRICS" <<'EOF'
import sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
except OSError:
    print(0); sys.exit()
print(int(float(next((l.split()[1] for l in text.splitlines() if l.startswith("polygon_ndjson_written_total ")), 0))))
EOF
}
wait_until() {  # wait_until SECONDS COMMAND...: poll with a deadline
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.1; done
}
has_data() { [ -s /var/log/polygon-streamer/pkgtest.ndjson ]; }
later_than() { [ "$(date +%s)" -gt "$1" ]; }
last_rotation=0
for round in 1 2 3; do
    wait_until 20 has_data || fail "no data in the live file before rotation $round"
    # dateformat has seconds: a rotation in the second the previous run ended in could take its name.
    wait_until 3 later_than "$last_rotation" || fail "the clock did not move"
    logrotate -f -s "$WORK/logrotate.state" /etc/polygon-streamer/logrotate.conf \
        > "$WORK/logrotate.$round.log" 2>&1 || { cat "$WORK/logrotate.$round.log"; fail "logrotate run $round"; }
    last_rotation=$(date +%s)
    if grep -Eiq "ignoring|skipping|error" "$WORK/logrotate.$round.log"; then
        cat "$WORK/logrotate.$round.log"; fail "logrotate complained in run $round"
    fi
done
all_written() { [ "$(written)" -ge "$EVENTS" ]; }
wait_until 60 all_written || fail "the streamer wrote $(written) of $EVENTS events"
kill -TERM "$STREAMER"
wait "$STREAMER" || fail "the streamer did not exit 0 on SIGTERM: $(tail -3 "$WORK/streamer.err")"
ls -l /var/log/polygon-streamer/
/usr/bin/python3 - "$EVENTS" <<'EOF' || fail "lines lost or duplicated across rotations"
import glob, gzip, json, sys
events = int(sys.argv[1])
files = sorted(glob.glob("/var/log/polygon-streamer/pkgtest.ndjson*"))
rotated = [f for f in files if f != "/var/log/polygon-streamer/pkgtest.ndjson"]
assert len(rotated) >= 3, f"expected 3 rotated files, found {rotated}"
assert any(f.endswith(".gz") for f in rotated), "compress did not run"
seqs = []
for name in files:
    opener = gzip.open if name.endswith(".gz") else open
    with opener(name, "rt") as handle:
        text = handle.read()
    assert not text or text.endswith("\n"), f"torn line at the end of {name}"
    seqs += [json.loads(line)["seq"] for line in text.splitlines()]
assert sorted(seqs) == list(range(1, events + 1)), f"{len(seqs)} lines, {len(set(seqs))} distinct"
print(f"debian_package: {events} events across {len(files)} files ({len(rotated)} rotated): none lost, none twice")
EOF

step "postrotate says so when there is no service to signal"
rm -f /var/log/polygon-streamer/pkgtest.ndjson*
setpriv --reuid=polygon-streamer --regid=polygon-streamer --init-groups sh -c \
    'echo "{}" > /var/log/polygon-streamer/pkgtest.ndjson'
logrotate -f -s "$WORK/logrotate.state" /etc/polygon-streamer/logrotate.conf > "$WORK/logrotate.none.log" 2>&1 || true
grep -q "no 'polygon-streamer run' of user polygon-streamer is running" "$WORK/logrotate.none.log" \
    || { cat "$WORK/logrotate.none.log"; fail "postrotate was silent with no service to signal"; }
rm -f /var/log/polygon-streamer/pkgtest.ndjson*

step "removing: the cron job then does nothing"
dpkg -L polygon-streamer > "$WORK/package.files"
rm -f /etc/polygon-streamer/pkgtest.env
apt-get remove -y -qq polygon-streamer > "$WORK/remove.log" 2>&1 || { cat "$WORK/remove.log"; fail "remove"; }
[ -f /etc/cron.d/polygon-streamer ] || fail "the cron file (a conffile) should stay until purge"
job=$(sed -n 's/^[0-9*][^ ]* [^ ]* [^ ]* [^ ]* [^ ]* root //p' /etc/cron.d/polygon-streamer)
[ -n "$job" ] || fail "no job line in /etc/cron.d/polygon-streamer"
rm -f /var/lib/logrotate/polygon-streamer.status
out=$(sh -c "$job" 2>&1) || true
[ -z "$out" ] && [ ! -e /var/lib/logrotate/polygon-streamer.status ] || fail "the cron job ran after remove: $out"

step "purging: nothing of the package is left (the system user stays)"
# What systemd leaves where the package was used: an enabled instance's link and the timer's stamp.
mkdir -p /etc/systemd/system/multi-user.target.wants /var/lib/systemd/timers
ln -sf /lib/systemd/system/polygon-streamer@.service /etc/systemd/system/multi-user.target.wants/polygon-streamer@stocks.service
touch /var/lib/systemd/timers/stamp-polygon-streamer-logrotate.timer
apt-get purge -y -qq polygon-streamer > "$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log"; fail "purge"; }
left=""
while read -r path; do
    case "$path" in *polygon*) [ -e "$path" ] && left="$left $path";; esac
done < "$WORK/package.files"
for path in /etc/polygon-streamer /etc/cron.d/polygon-streamer /var/log/polygon-streamer /var/lib/polygon-streamer \
            /var/lib/logrotate/polygon-streamer.status /etc/systemd/system/multi-user.target.wants/polygon-streamer@stocks.service \
            /var/lib/systemd/timers/stamp-polygon-streamer-logrotate.timer; do
    [ -e "$path" ] && left="$left $path"
done
[ -z "$left" ] || fail "left after purge:$left"
step "under a booted systemd (tests/debian_systemd.sh)"
bash "$ROOT/tests/debian_systemd.sh" "$DEB" || fail "the package under a booted systemd"
step "OK"
