#!/usr/bin/env bash
# Schemathesis against docs/openapi.json (issue 11): starts the built-in Graph simulator and
# `calsync serve` on it (loopback, free ports, a temporary SQLite store and a random API token),
# runs a bounded, reproducible property-based run (fixed seed, a fixed number of examples per
# operation) and stops both. Passes only with zero 5xx answers and zero answers that break the
# OpenAPI description (status codes, content types, headers, bodies).
set -euo pipefail
cd "$(dirname "$0")/.."

SEED="${SCHEMATHESIS_SEED:-20261202}"
EXAMPLES="${SCHEMATHESIS_EXAMPLES:-150}"
bin="${CALSYNC_BIN:-target/debug/calsync}"
[ -x "${bin}" ] || cargo build --locked --bin calsync

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
    rm -rf "${work}"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
sim_port="$(free_port)"
api_port="$(free_port)"
token="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

# The simulator's world of docker-compose: its tenants and their (simulator-only) secrets.
"${bin}" sim --listen "127.0.0.1:${sim_port}" --config deploy/compose/sim.toml >"${work}/sim.log" 2>&1 &
pids+=("$!")

cat >"${work}/calsync.toml" <<TOML
[server]
listen = "127.0.0.1:${api_port}"
[store]
url = "sqlite://${work}/calsync.db"
[graph]
base_url = "http://127.0.0.1:${sim_port}/v1.0"
authority = "http://127.0.0.1:${sim_port}"
request_timeout = "10s"
[sync]
interval = "30s"
job_deadline = "40s"
[log]
level = "warn"
[api]
token = "${token}"

[[tenants]]
name = "contoso"
tenant_id = "contoso.example"
client_id = "aaaaaaaa-0000-0000-0000-000000000001"
client_secret = "sim-contoso~secret-for-the-simulator-only"
mailboxes = ["alice@contoso.example", "bob@contoso.example", "carol@contoso.example"]
# Writes on, so the write API's checks are fuzzed (fabrikam's stay off: its answer is the 403).
writes = true

[[tenants]]
name = "fabrikam"
tenant_id = "fabrikam.example"
client_id = "aaaaaaaa-0000-0000-0000-000000000002"
client_secret = "sim-fabrikam~secret-for-the-simulator-only"
mailboxes = ["dave@fabrikam.example", "erin@fabrikam.example"]
TOML
"${bin}" serve --config "${work}/calsync.toml" >"${work}/serve.log" 2>&1 &
pids+=("$!")

base="http://127.0.0.1:${api_port}"
python3 - "${base}/readyz" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 60
while True:
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200:
            break
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit("calsync did not become ready within 60 s")
    time.sleep(0.2)
PY

status=0
# From the scratch directory: schemathesis keeps its state in the working directory.
(cd "${work}" && st run "${base}/v1/openapi.json" \
    --url "${base}" \
    --header "Authorization: Bearer ${token}" \
    --seed "${SEED}" \
    --max-examples "${EXAMPLES}" \
    --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance}" \
    --workers 1 \
    --generation-database none \
    --request-timeout 20 \
    --no-color \
    --output-sanitize true) \
    || status=$?
if [ "${status}" -ne 0 ]; then
    echo "---- calsync serve log (last 50 lines)"
    tail -n 50 "${work}/serve.log" || true
fi
exit "${status}"
