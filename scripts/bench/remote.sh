#!/usr/bin/env bash
# The remote cache's figures, against a real S3 server on 127.0.0.1 (scripts/s3/server.sh; started and stopped here):
#   1. the 200-node command DAG (scripts/bench/cold_dag.py 5): cold run with push, then no-op runs without and
#      with --remote, alternating, and a fresh cache pulling all of it;
#   2. the quickstart (unless QUICKSTART=0): computed once, pushed, then pulled into an empty cache by `mpcs run`
#      (and by `mpcs pull`), with the requests each made.
# LATENCY_MS=N puts scripts/bench/latency_proxy.py in front of the server: N ms each way, as on a real network.
# MPCS_BEFORE=BINARY also times that binary's pull of the DAG, alternating with this one's.
# Run by hand from the repository root after `cargo build --release`:   scripts/bench/remote.sh [RUNS]
set -euo pipefail
runs=${1:-10}
repo=$PWD
mpcs=${MPCS:-$repo/target/release/mpcs}
work=$(mktemp -d)
trap 'bash "$repo/scripts/s3/server.sh" stop "$work/s3" >/dev/null; rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; $("$mpcs" --version)"
eval "$(bash scripts/s3/server.sh start "$work/s3")"
if [ -n "${LATENCY_MS:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 scripts/bench/latency_proxy.py "$port" "${AWS_ENDPOINT_URL##*:}" "$LATENCY_MS" &
  proxy=$!
  trap 'kill $proxy; bash "$repo/scripts/s3/server.sh" stop "$work/s3" >/dev/null; rm -rf "$work"' EXIT
  export AWS_ENDPOINT_URL=http://127.0.0.1:$port
  sleep 0.5
  echo "through a proxy adding ${LATENCY_MS} ms each way"
fi
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
requests() { tail -1 | python3 -c 'import json,sys; v=json.load(sys.stdin); r=v["remote"]; n=lambda k: len(v[k]); print("executed", n("executed"), "pulled", n("pulled"), "pushed", r["pushed"], "requests", r["requests"])'; }

echo "== 200-node command DAG"
python3 scripts/bench/cold_dag.py 5 "$work/dag" >/dev/null
cd "$work/dag"
t0=$(now); "$mpcs" run exp.toml --cache c1 --remote s3://mpcs/dag --json --quiet | requests; t1=$(now)
echo "cold run + push: $(secs "$t0" "$t1") s"
without=(); with=()
for _ in $(seq "$runs"); do
  t0=$(now); "$mpcs" run exp.toml --cache c1 --quiet >/dev/null 2>&1; t1=$(now); without+=("$(secs "$t0" "$t1")")
  t0=$(now); "$mpcs" run exp.toml --cache c1 --remote s3://mpcs/dag --quiet >/dev/null 2>&1; t1=$(now); with+=("$(secs "$t0" "$t1")")
done
echo "no-op run without remote (s): ${without[*]}"
echo "no-op run with remote    (s): ${with[*]}"
"$mpcs" run exp.toml --cache c1 --remote s3://mpcs/dag --json --quiet | requests
t0=$(now); "$mpcs" run exp.toml --cache c2 --remote s3://mpcs/dag --json --quiet | requests; t1=$(now)
echo "fresh cache pulling everything: $(secs "$t0" "$t1") s"
t0=$(now); "$mpcs" graph exp.toml --cache c-empty --remote s3://mpcs/dag >/dev/null; t1=$(now)
echo "graph of an empty cache (199 remote nodes, their records fetched): $(secs "$t0" "$t1") s"
if [ -n "${MPCS_BEFORE:-}" ]; then
  for _ in 1 2 3; do
    for bin in "$MPCS_BEFORE" "$mpcs"; do
      t0=$(now); "$bin" graph exp.toml --cache c-empty --remote s3://mpcs/dag >/dev/null; t1=$(now)
      echo "graph of an empty cache, $bin: $(secs "$t0" "$t1") s"
    done
  done
  for _ in 1 2 3; do
    for bin in "$MPCS_BEFORE" "$mpcs"; do
      rm -rf c3
      t0=$(now); "$bin" run exp.toml --cache c3 --remote s3://mpcs/dag --quiet >/dev/null 2>&1; t1=$(now)
      echo "fresh cache pulling everything, $bin: $(secs "$t0" "$t1") s"
    done
  done
fi
cd "$repo"

if [ "${QUICKSTART:-1}" != 0 ]; then
  echo "== quickstart"
  q=experiments/quickstart.toml
  t0=$(now); "$mpcs" run "$q" --cache "$work/qa" --remote s3://mpcs/quickstart --json --quiet | requests; t1=$(now)
  echo "cold run + push: $(secs "$t0" "$t1") s; cache $(du -sh "$work/qa" | cut -f1)"
  t0=$(now); "$mpcs" run "$q" --cache "$work/qb" --remote s3://mpcs/quickstart --remote-mode read --json --quiet | requests; t1=$(now)
  echo "mpcs run into an empty cache (pulls everything): $(secs "$t0" "$t1") s"
  cmp "$(find "$work/qa" -path '*out/table.md' | head -1)" "$(find "$work/qb" -path '*out/table.md' | head -1)" && echo "tables byte-identical"
  t0=$(now); "$mpcs" --cache "$work/qc" pull "$q" --remote s3://mpcs/quickstart; t1=$(now)
  echo "mpcs pull into an empty cache: $(secs "$t0" "$t1") s"
fi
