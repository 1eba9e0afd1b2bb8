#!/usr/bin/env bash
# bench/smtp.sh: the mailserv MX against Postfix on the same workload (see bench/README.md).
#
# Both servers listen on 127.0.0.1 and deliver to a maildir with fsync; Postfix is
# configured by this script as its own instance (virtual(8) delivery) and never
# touches the system's Postfix or port 25.  smtp-source (Debian package postfix)
# sends the messages; the clock stops when the last message is in the maildir.
#
# Usage: bench/smtp.sh            (env: PYTHON, MS_PORT, PF_PORT, KEEP=1, QUICK=1)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
if [ -z "${PYTHON:-}" ]; then  # the project's venv (Twisted and mailserv's dependencies)
    for p in "$ROOT/.venv/bin/python" /work/venv/bin/python; do
        [ -x "$p" ] && { PYTHON=$p; break; }
    done
    PYTHON=${PYTHON:-$(command -v python3)}
fi
MS_PORT=${MS_PORT:-22525}
PF_PORT=${PF_PORT:-22526}
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
POSTFIX=$(command -v postfix || echo /usr/sbin/postfix)
POSTCONF=$(command -v postconf || echo /usr/sbin/postconf)
[ -x "$SMTP_SOURCE" ] && [ -x "$POSTFIX" ] || {
    echo "smtp-source/postfix missing: apt-get install -y postfix" >&2
    exit 2
}
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix's master must start as root)" >&2; exit 2; }

W=$(mktemp -d /tmp/mailserv-bench.XXXXXX)
chmod 755 "$W"
MS_PID=""
cleanup() {
    [ -n "$MS_PID" ] && kill "$MS_PID" 2>/dev/null && wait "$MS_PID" 2>/dev/null || true
    "$POSTFIX" -c "$W/pf/etc" stop >/dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT

# ---------------------------------------------------------------- mailserv
mkdir -p "$W/ms"
printf 'u@example.test:{PLAIN}bench::::::\nl@example.test:{PLAIN}bench::::::\n' > "$W/ms/users.passwd"
{
    ms_config_head "$W/ms" "$MS_PORT"
    cat <<EOF
max_messages_per_connection = 100000  # smtp-source -d sends every message on one connection
[threads]
# Deliveries (and their fsyncs) in parallel, as many as Postfix's virtual(8)
# default_destination_concurrency_limit (20); the default pool has 10 threads.
disk = ${MS_DISK_THREADS:-20}
[store]
format = "maildir"
path = "$W/ms/mail/{domain}/{localpart}/Maildir"
fsync = true
quota = "100G"  # the benchmark fills one mailbox with 600 MB
EOF
} > "$W/ms/mailserv.toml"
port_free "$MS_PORT"
port_free "$PF_PORT"
ms_start "$W/ms"

# ---------------------------------------------------------------- Postfix
PF=$W/pf
mkdir -p "$PF/etc" "$PF/spool" "$PF/data" "$PF/mail"
cp /etc/postfix/master.cf "$PF/etc/master.cf"
: > "$PF/etc/main.cf"
sed -i "s/^smtp      inet .*smtpd\$/127.0.0.1:$PF_PORT inet n - n - - smtpd/" "$PF/etc/master.cf"
grep -q "^127.0.0.1:$PF_PORT inet" "$PF/etc/master.cf" || { echo "master.cf edit failed" >&2; exit 1; }
chown -R postfix "$PF/data"
chown 65534:65534 "$PF/mail"
printf 'u@example.test example.test/u/\nl@example.test example.test/l/\n' > "$PF/vmailbox"
"$POSTCONF" -c "$PF/etc" -e \
    "compatibility_level=3.6" "queue_directory=$PF/spool" "data_directory=$PF/data" \
    "inet_interfaces=127.0.0.1" "inet_protocols=ipv4" "myhostname=pf.example.test" \
    "mydestination=" "relayhost=" "alias_maps=" "alias_database=" "local_recipient_maps=" \
    "virtual_mailbox_domains=example.test" "virtual_mailbox_base=$PF/mail" \
    "virtual_mailbox_maps=texthash:$PF/vmailbox" \
    "virtual_uid_maps=static:65534" "virtual_gid_maps=static:65534" \
    "mynetworks=127.0.0.0/8" "smtpd_relay_restrictions=permit_mynetworks,reject_unauth_destination" \
    "smtpd_client_connection_count_limit=0" "smtpd_client_connection_rate_limit=0" \
    "smtpd_client_message_rate_limit=0" "default_process_limit=100" \
    "smtpd_tls_security_level=none" "message_size_limit=20480000" \
    "maillog_file_prefixes=$PF" "maillog_file=$PF/maillog"
"$POSTFIX" -c "$PF/etc" start >/dev/null 2>&1 || true

# ---------------------------------------------------------------- measurements
cat > "$W/measure.py" <<'EOF'
"""Timing helper of bench/smtp.sh: throughput, latency to the maildir, peak RSS."""
import json, os, smtplib, socket, statistics, subprocess, sys, time


def count(d):
    try:
        return len(os.listdir(d))
    except FileNotFoundError:
        return 0


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def throughput(smtp_source, port, newdir, msgs, size, sessions):
    before = count(newdir)
    start = time.monotonic()
    subprocess.run([smtp_source, "-d", "-s", str(sessions), "-m", str(msgs), "-l", str(size),
                    "-f", "bench@remote.test", "-t", "u@example.test", f"127.0.0.1:{port}"],
                   check=True)
    deadline = time.monotonic() + 600
    while count(newdir) < before + msgs:
        if time.monotonic() > deadline:
            sys.exit("timeout waiting for deliveries")
        time.sleep(0.005)
    return msgs / (time.monotonic() - start)


def latency(port, newdir, n=50):
    """To its own mailbox (l@): listing the throughput mailbox of 13 000 files would take
    longer than the delivery it waits for."""
    body = b"Subject: latency\r\n\r\n" + (b"x" * 76 + b"\r\n") * 50
    out = []
    for _ in range(n):
        before = count(newdir)
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("bench@remote.test", ["l@example.test"], body)
        while count(newdir) <= before:
            time.sleep(0.0005)
        out.append(time.monotonic() - start)
    return statistics.median(out)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "wait":
        wait_port(int(sys.argv[2]))
    elif what == "throughput":
        print(f"{throughput(sys.argv[2], int(sys.argv[3]), sys.argv[4], *map(int, sys.argv[5:8])):.1f}")
    elif what == "latency":
        print(f"{latency(int(sys.argv[2]), sys.argv[3]) * 1000:.2f}")
    elif what == "rss":  # peak RSS of each pid, and the sum of their current PSS
        peaks, pss = [], 0
        for pid in sys.argv[2:]:
            with open(f"/proc/{pid}/status") as f:
                peaks += [int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM:")]
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss += sum(int(l.split()[1]) for l in f if l.startswith("Pss:"))
        print(" + ".join(map(str, peaks)), f"MB (PSS of all now: {pss // 1024} MB)")
EOF

M() { "$PYTHON" "$W/measure.py" "$@"; }
M wait "$MS_PORT"
M wait "$PF_PORT"
MS_NEW="$W/ms/mail/example.test/u/Maildir/new"
PF_NEW="$PF/mail/example.test/u/new"

SMALL=${SMALL:-2000}
LARGE=${LARGE:-200}
if [ "${QUICK:-0}" = 1 ]; then SMALL=200; LARGE=20; fi

ROUNDS=${ROUNDS:-3}
median() { tr ' ' '\n' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
printf "%-28s %12s %12s %8s   %s\n" "workload" "mailserv" "postfix" "ratio" "rounds (mailserv/postfix)"
row() {  # name msgs size sessions: ROUNDS alternating rounds, medians
    local ms pf all="" mss="" pfs=""
    for _ in $(seq "$ROUNDS"); do
        ms=$(M throughput "$SMTP_SOURCE" "$MS_PORT" "$MS_NEW" "$2" "$3" "$4")
        pf=$(M throughput "$SMTP_SOURCE" "$PF_PORT" "$PF_NEW" "$2" "$3" "$4")
        mss="$mss $ms"; pfs="$pfs $pf"; all="$all $ms/$pf"
    done
    ms=$(echo $mss | median); pf=$(echo $pfs | median)
    printf "%-28s %9s/s %9s/s %7.2fx  %s\n" "$1" "$ms" "$pf" "$(echo "$ms / $pf" | bc -l)" "$all"
}
row "4 KiB x $SMALL, 1 session" "$SMALL" 4096 1
row "4 KiB x $SMALL, 20 sessions" "$SMALL" 4096 20
row "1 MiB x $LARGE, 1 session" "$LARGE" 1048576 1
row "1 MiB x $LARGE, 20 sessions" "$LARGE" 1048576 20
ms=$(M latency "$MS_PORT" "$W/ms/mail/example.test/l/Maildir/new")
pf=$(M latency "$PF_PORT" "$PF/mail/example.test/l/new")
printf "%-28s %10sms %10sms %7.2fx\n" "median latency to maildir" "$ms" "$pf" "$(echo "$ms / $pf" | bc -l)"
TWISTD_PID=$(pgrep -P "$MS_PID" -f twistd || echo "$MS_PID")
HELPERS=$(pgrep -P "$TWISTD_PID" -f mailserv.helper_child | tr '\n' ' ')
echo "mailserv peak RSS, twistd + delivery helpers: $(M rss "$TWISTD_PID" $HELPERS)"
