# Shared by bench/smtp.sh and bench/relay.sh (sourced after ROOT and PYTHON are set).

# ms_config_head DIR PORT: the start of a benchmark mailserv.toml: state in DIR, a passwd-file
# of users in DIR/users.passwd, an MX listener on 127.0.0.1:PORT. The [listeners.mx] table comes
# last, so the caller may append keys to it before opening its own tables.
ms_config_head() {
    cat <<EOF
config_version = 1
hostname = "ms.example.test"
domains = ["example.test"]
state_dir = "$1"
[auth]
backends = ["local"]
[auth.backend.local]
type = "passwd-file"
path = "$1/users.passwd"
[listeners.mx]
protocol = "smtp"
endpoints = ["tcp:$2:interface=127.0.0.1"]
tls = "none"
max_connections_per_ip = 100
EOF
}

# ms_start DIR [twistd options...]: twistd -n mailserv --config DIR/mailserv.toml in the
# background, logging to DIR/twistd.log; sets MS_PID.
ms_start() {
    local dir=$1
    shift
    (cd "$dir" && PYTHONPATH="$ROOT" exec "$PYTHON" -c \
        "import sys; from twisted.scripts.twistd import run; sys.exit(run())" \
        -n --pidfile= --logfile="$dir/twistd.log" "$@" mailserv --config "$dir/mailserv.toml") &
    MS_PID=$!
}

port_free() {  # a server left over from another run would take the benchmark's connections
    if ss -ltnH "sport = :$1" | grep -q LISTEN; then
        echo "port $1 is in use (a server left from another run?)" >&2
        return 1
    fi
}
