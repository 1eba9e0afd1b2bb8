#!/usr/bin/env bash
# bench/relay.sh: mailserv's outbound queue against Postfix relaying the same load (bench/README.md).
#
# smtp-source submits N messages of 4 KiB for remote.test; each server queues them durably
# and relays them to Postfix's smtp-sink on 127.0.0.2 (the "remote MX").  The clock runs from
# the first submission until the server's queue is empty.  mailserv finds the sink by a real
# MX lookup (tests/support/dnsserver.py on loopback); Postfix by transport_maps (it cannot be
# pointed at a DNS server on another port).  Postfix runs as its own instance configured here;
# it never touches the system's Postfix or port 25.
#
# Usage: bench/relay.sh     (env: PYTHON, MESSAGES=2000, SIZE=4096, SESSIONS=20, ROUNDS=3, KEEP=1,
#                           DELIVERY=process|inline: mailserv's [queue] delivery (default process),
#                           BASELINE=DIR: also run the mailserv of another checkout DIR (e.g. an
#                           older commit: git worktree add /tmp/base COMMIT) in the same rounds,
#                           PROFILE=FILE: cProfile stats of the twistd process, DETAIL=1: each
#                           mailserv process's CPU per message in the relay, for diagnosis only)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}  # the README install: Twisted and mailserv's dependencies
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
MESSAGES=${MESSAGES:-2000}
SIZE=${SIZE:-4096}
SESSIONS=${SESSIONS:-20}
ROUNDS=${ROUNDS:-3}
DELIVERY=${DELIVERY:-process}
MS_PORT=${MS_PORT:-23525}
PF_PORT=${PF_PORT:-23526}
SINK_PORT=${SINK_PORT:-23527}
BASE_PORT=${BASE_PORT:-23528}
BASELINE=${BASELINE:-}
[ -z "$BASELINE" ] || [ -d "$BASELINE/mailserv" ] || { echo "BASELINE=$BASELINE: no mailserv/ there" >&2; exit 2; }
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
POSTFIX=$(command -v postfix || echo /usr/sbin/postfix)
POSTCONF=$(command -v postconf || echo /usr/sbin/postconf)
[ -x "$SMTP_SOURCE" ] && [ -x "$SMTP_SINK" ] && [ -x "$POSTFIX" ] || {
    echo "smtp-source/smtp-sink/postfix missing: apt-get install -y postfix" >&2
    exit 2
}
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix's master must start as root)" >&2; exit 2; }

W=$(mktemp -d /tmp/mailserv-relay.XXXXXX)
chmod 755 "$W"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
    "$POSTFIX" -c "$W/pf/etc" stop >/dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT

# ---------------------------------------------------------------- the remote MX and its DNS
SINK_PID=""
start_sink() {
    "$SMTP_SINK" -u root "127.0.0.2:$SINK_PORT" 1024 >>"$W/sink.log" 2>&1 &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
}
stop_sink() { kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; }
start_sink
mkdir -p "$W/dns"
cat > "$W/dns/zones.json" <<EOF
{"remote.test": {"MX": [[10, "mx.remote.test"]]}, "mx.remote.test": {"A": ["127.0.0.2"]}}
EOF
PYTHONPATH="$ROOT" "$PYTHON" "$ROOT/tests/support/dnsserver.py" "$W/dns/zones.json" "$W/dns/port" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$W/dns/port" ] && break; sleep 0.1; done
DNS_PORT=$(cat "$W/dns/port")

# ---------------------------------------------------------------- mailserv
ms_config() {  # DIR PORT: the configuration of a benchmark mailserv in DIR
    mkdir -p "$1"
    : > "$1/users.passwd"
    {
        ms_config_head "$1" "$2"
        cat <<EOF
[store]
format = "maildir"
path = "$1/mail/{domain}/{localpart}/Maildir"
[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]
[queue]
smtp_port = $SINK_PORT
delivery = "$DELIVERY"
[aliases]
"relay@example.test" = "sink@remote.test"
EOF
    } > "$1/mailserv.toml"
}
BASE_PID=""
if [ -n "$BASELINE" ]; then  # the other checkout's mailserv: its own state, the same sink
    ms_config "$W/base" "$BASE_PORT"
    ROOT=$BASELINE ms_start "$W/base"
    BASE_PID=$MS_PID
    PIDS+=("$BASE_PID")
fi
ms_config "$W/ms" "$MS_PORT"
PROFILE_ARGS=()
[ -n "${PROFILE:-}" ] && PROFILE_ARGS=(--profile="$PROFILE" --profiler=cprofile --savestats)
ms_start "$W/ms" "${PROFILE_ARGS[@]}"
PIDS+=("$MS_PID")

# ---------------------------------------------------------------- Postfix
PF=$W/pf
mkdir -p "$PF/etc" "$PF/spool" "$PF/data"
cp /etc/postfix/master.cf "$PF/etc/master.cf"
: > "$PF/etc/main.cf"
sed -i "s/^smtp      inet .*smtpd\$/127.0.0.1:$PF_PORT inet n - n - - smtpd/" "$PF/etc/master.cf"
grep -q "^127.0.0.1:$PF_PORT inet" "$PF/etc/master.cf" || { echo "master.cf edit failed" >&2; exit 1; }
chown -R postfix "$PF/data"
"$POSTCONF" -c "$PF/etc" -e \
    "compatibility_level=3.6" "queue_directory=$PF/spool" "data_directory=$PF/data" \
    "inet_interfaces=127.0.0.1" "inet_protocols=ipv4" "myhostname=pf.example.test" \
    "mydestination=" "relayhost=" "alias_maps=" "alias_database=" "local_recipient_maps=" \
    "mynetworks=127.0.0.0/8" "smtpd_relay_restrictions=permit_mynetworks,reject" \
    "transport_maps=inline:{remote.test=smtp:[127.0.0.2]:$SINK_PORT}" \
    "smtpd_client_connection_count_limit=0" "smtpd_client_connection_rate_limit=0" \
    "smtpd_client_message_rate_limit=0" "default_process_limit=100" \
    "smtpd_tls_security_level=none" "smtp_tls_security_level=may" \
    "message_size_limit=20480000" "maillog_file_prefixes=$PF" "maillog_file=$PF/maillog"
"$POSTFIX" -c "$PF/etc" start >/dev/null 2>&1 || true

# ---------------------------------------------------------------- measurements
cat > "$W/measure.py" <<'EOF'
"""Timing helper of bench/relay.sh: messages per second from submission to an empty queue."""
import os, socket, subprocess, sys, time


def wait_port(host, port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {host}:{port}")


def queued(kind, spool):
    # Polled every 10 ms while the other cores deliver: a listing, not a glob (fnmatch of
    # thousands of names per poll cost ~0.3 ms of CPU per message delivered).
    if kind == "mailserv":
        return sum(1 for name in os.listdir(spool) if name.endswith((".entry", ".env")))
    return sum(len(files) for sub in ("maildrop", "incoming", "active", "deferred", "hold")
               for _, _, files in os.walk(os.path.join(spool, sub)))


def rate(smtp_source, kind, port, spool, rcpt, msgs, size, sessions, root):
    before = {}
    cpu = tree_cpu(root, before)
    start = time.monotonic()
    subprocess.run([smtp_source, "-d", "-s", str(sessions), "-m", str(msgs), "-l", str(size),
                    "-f", "bench@example.org", "-t", rcpt, f"127.0.0.1:{port}"], check=True)
    submitted = time.monotonic() - start
    deadline = time.monotonic() + 600
    while queued(kind, spool):
        if time.monotonic() > deadline:
            sys.exit(f"{kind}: queue not empty after 600 s")
        time.sleep(0.01)
    after = {}
    used = (tree_cpu(root, after) - cpu) * 1000 / msgs
    if os.environ.get("DETAIL") and kind == "mailserv":  # each process's CPU per message
        print("  ".join(f"{k}: {(v - before.get(k, 0)) * 1000 / msgs:.2f}" for k, v in after.items()),
              file=sys.stderr)
    return msgs / (time.monotonic() - start), msgs / submitted, used


def submit(smtp_source, port, rcpt, msgs, size, sessions):
    subprocess.run([smtp_source, "-d", "-s", str(sessions), "-m", str(msgs), "-l", str(size),
                    "-f", "bench@example.org", "-t", rcpt, f"127.0.0.1:{port}"], check=True)


def all_deferred(kind, spool, msgs):
    """Every message has had its (failed) first attempt."""
    deadline = time.monotonic() + 600
    while True:
        if kind == "mailserv":
            done = sum(1 for name in os.listdir(spool) if name.endswith(".state"))
        else:
            done = sum(len(f) for _, _, f in os.walk(os.path.join(spool, "deferred")))
        if done >= msgs:
            return
        if time.monotonic() > deadline:
            sys.exit(f"{kind}: only {done} of {msgs} deferred")
        time.sleep(0.05)


def flush_request(spool):
    """What `mailserv queue flush` does for a running server (mailserv/queue/state.py
    post_control), without the CLI's interpreter start (~0.3 s, not the delivery engine's)."""
    name = f"{time.time():.6f}-bench.json"
    tmp = os.path.join(spool, "control", f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write('{"op": "flush", "id": null}')
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(spool, "control", name))


def tree_cpu(root, each=None):
    """CPU seconds of process ``root`` and its descendants, with their reaped children
    (``each``: a dict to receive each process's own, by "pid name")."""
    parent, cpu = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid and p not in tree)
    if each is not None:
        for pid in tree:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
            except OSError:
                continue
            name = next((w for w in reversed(words) if w.startswith((b"mailserv.", b"mailserv"))),
                        words[0]).decode(errors="replace")
            each[f"{pid} {name}"] = cpu.get(pid, 0) / os.sysconf("SC_CLK_TCK")
    return sum(cpu.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def drain(kind, spool, command, msgs, root):
    cpu = tree_cpu(root)
    start = time.monotonic()
    if command == ["flush"]:
        flush_request(spool)
    else:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while queued(kind, spool):
        if time.monotonic() > deadline:
            sys.exit(f"{kind}: queue not empty after 600 s")
        time.sleep(0.01)
    rate = msgs / (time.monotonic() - start)
    return rate, (tree_cpu(root) - cpu) * 1000 / msgs


if __name__ == "__main__":
    if sys.argv[1] == "wait":
        wait_port(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "submit":
        submit(sys.argv[2], int(sys.argv[3]), sys.argv[4], *map(int, sys.argv[5:8]))
    elif sys.argv[1] == "deferred":
        all_deferred(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "drain":
        rate, cpu = drain(sys.argv[2], sys.argv[3], sys.argv[6:], int(sys.argv[4]), int(sys.argv[5]))
        print(f"{rate:.1f} {cpu:.2f}")
    else:
        total, accept, cpu = rate(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4],
                                  sys.argv[5], *map(int, sys.argv[6:10]))
        print(f"{total:.1f} {accept:.1f}/s, {cpu:.2f} ms")
EOF

"$PYTHON" "$W/measure.py" wait 127.0.0.2 "$SINK_PORT"
"$PYTHON" "$W/measure.py" wait 127.0.0.1 "$MS_PORT"
"$PYTHON" "$W/measure.py" wait 127.0.0.1 "$PF_PORT"
[ -z "$BASELINE" ] || "$PYTHON" "$W/measure.py" wait 127.0.0.1 "$BASE_PORT"

echo "relay: $MESSAGES messages of $SIZE bytes, $SESSIONS sessions, $ROUNDS rounds;" \
    "mailserv delivery=$DELIVERY${BASELINE:+; baseline: the mailserv of $BASELINE}"
echo "msgs/s from the first submission until the queue is empty (in brackets: the submission-only"
echo "rate, and the CPU time of the server's processes, all of them, per message)"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms=(); pf=(); bs=()
for round in $(seq "$ROUNDS"); do
    b=""
    if [ -n "$BASELINE" ]; then
        read -r b ba < <("$PYTHON" "$W/measure.py" "$SMTP_SOURCE" mailserv "$BASE_PORT" \
            "$W/base/queue" relay@example.test "$MESSAGES" "$SIZE" "$SESSIONS" "$BASE_PID")
        bs+=("$b"); b="   baseline $b msgs/s ($ba)"
    fi
    read -r m ma < <("$PYTHON" "$W/measure.py" "$SMTP_SOURCE" mailserv "$MS_PORT" "$W/ms/queue" \
        relay@example.test "$MESSAGES" "$SIZE" "$SESSIONS" "$MS_PID")
    read -r p pa < <("$PYTHON" "$W/measure.py" "$SMTP_SOURCE" postfix "$PF_PORT" "$PF/spool" \
        sink@remote.test "$MESSAGES" "$SIZE" "$SESSIONS" "$(cat "$PF/spool/pid/master.pid")")
    echo "round $round: mailserv $m msgs/s ($ma)   postfix $p msgs/s ($pa)$b"
    ms+=("$m"); pf+=("$p")
done
echo "median: mailserv $(median "${ms[@]}") msgs/s   postfix $(median "${pf[@]}") msgs/s" \
    "${BASELINE:+  baseline $(median "${bs[@]}") msgs/s}"

# Delivery alone: both queues fill while the sink is down, then each is flushed in turn and
# timed until it is empty (a flush request in queue/control/, as `mailserv queue flush` makes
# it, without the CLI's start-up / postqueue -f).
echo
echo "drain: $MESSAGES deferred messages flushed to the sink, msgs/s until the queue is empty"
echo "(in brackets: CPU time of the server's processes, all of them, per message)"
ms=(); pf=(); bs=()
for round in $(seq "$ROUNDS"); do
    stop_sink
    "$PYTHON" "$W/measure.py" submit "$SMTP_SOURCE" "$MS_PORT" relay@example.test \
        "$MESSAGES" "$SIZE" "$SESSIONS"
    "$PYTHON" "$W/measure.py" submit "$SMTP_SOURCE" "$PF_PORT" sink@remote.test \
        "$MESSAGES" "$SIZE" "$SESSIONS"
    [ -z "$BASELINE" ] || "$PYTHON" "$W/measure.py" submit "$SMTP_SOURCE" "$BASE_PORT" \
        relay@example.test "$MESSAGES" "$SIZE" "$SESSIONS"
    "$PYTHON" "$W/measure.py" deferred mailserv "$W/ms/queue" "$MESSAGES"
    "$PYTHON" "$W/measure.py" deferred postfix "$PF/spool" "$MESSAGES"
    [ -z "$BASELINE" ] || "$PYTHON" "$W/measure.py" deferred mailserv "$W/base/queue" "$MESSAGES"
    start_sink
    "$PYTHON" "$W/measure.py" wait 127.0.0.2 "$SINK_PORT"
    b=""
    if [ -n "$BASELINE" ]; then
        read -r b bc < <("$PYTHON" "$W/measure.py" drain mailserv "$W/base/queue" "$MESSAGES" \
            "$BASE_PID" flush)
        bs+=("$b"); b="   baseline $b msgs/s ($bc ms)"
    fi
    read -r m mc < <("$PYTHON" "$W/measure.py" drain mailserv "$W/ms/queue" "$MESSAGES" \
        "$MS_PID" flush)
    read -r p pc < <("$PYTHON" "$W/measure.py" drain postfix "$PF/spool" "$MESSAGES" \
        "$(cat "$PF/spool/pid/master.pid")" /usr/sbin/postqueue -c "$PF/etc" -f)
    echo "round $round: mailserv $m msgs/s ($mc ms)   postfix $p msgs/s ($pc ms)$b"
    ms+=("$m"); pf+=("$p")
done
echo "median: mailserv $(median "${ms[@]}") msgs/s   postfix $(median "${pf[@]}") msgs/s" \
    "${BASELINE:+  baseline $(median "${bs[@]}") msgs/s}"
# Peak RSS of twistd and of its children (the delivery process with DELIVERY=process).
for pid in "$MS_PID" $(pgrep -P "$MS_PID" || true); do
    echo "mailserv peak RSS (pid $pid): $(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "?") kB"
done
