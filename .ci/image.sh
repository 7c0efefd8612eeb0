#!/usr/bin/env bash
# The image, built and run as a user runs it (issue 12). This machine kind has no Docker engine
# and cannot pull from Docker Hub, so: Debian's podman with the runc runtime builds the Dockerfile;
# the runtime stage's base is made with debootstrap and imported under the Dockerfile's name; the
# production binary is built on the host and fed through the build context (CALSYNC_BINARY=context).
# The container then runs on `calsync sim` started here on the host: its own non-root UID, /data on
# a volume, a read-only root, configured only by CALSYNC_* variables. It must sync, the image's
# HEALTHCHECK must say healthy, and SIGTERM must end it within server.shutdown_grace.
#   sudo bash .ci/image.sh
# Cached between runs: the Debian base tarball in /var/cache/calsync-ci (rebuilt after 30 days),
# the imported base and the build layers in podman's storage, and cargo's target/production.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

IMAGE="${CALSYNC_IMAGE:-localhost/calsync:ci}"
CACHE_DIR=/var/cache/calsync-ci
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
GRACE_SECONDS=10
# Generous: the machine is shared and may be busy; the loops end as soon as the condition holds.
READY_TIMEOUT=60
SYNC_TIMEOUT=180
TENANTS=2
MAILBOXES=3

say() { printf '== image [%d s]: %s\n' "${SECONDS}" "$*"; }
die() {
    printf '\nimage check FAILED: %s\n' "$*" >&2
    exit 1
}
on_error() {
    local status=$? line=$1 command=$2
    die "line ${line}: \`${command%%$'\n'*}\` exited with ${status}"
}
trap 'on_error "${LINENO}" "${BASH_COMMAND}"' ERR
trap 'exit 130' INT TERM

work="$(mktemp -d)"
sim_pid=""
container=""
volume=""
rootfs=""
cleanup() {
    local status=$?
    trap - ERR
    if [ -n "${container}" ]; then
        if [ "${status}" -ne 0 ]; then
            echo "---- container log (last 40 lines)" >&2
            podman logs --tail 40 "${container}" >&2 2>&1 || true
        fi
        podman rm --force --time 0 "${container}" >/dev/null 2>&1 || true
    fi
    [ -z "${volume}" ] || podman volume rm --force "${volume}" >/dev/null 2>&1 || true
    if [ -n "${sim_pid}" ]; then
        kill "${sim_pid}" 2>/dev/null || true
        wait "${sim_pid}" 2>/dev/null || true
        if [ "${status}" -ne 0 ]; then
            echo "---- simulator log (last 20 lines)" >&2
            grep -v 'client_secret=' "${work}/sim.log" | tail -n 20 >&2 || true
        fi
    fi
    [ -z "${rootfs}" ] || rm -rf "${rootfs}"
    rm -rf "${work}"
    exit "${status}"
}
trap cleanup EXIT

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds; fails naming WHAT.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        [ "${SECONDS}" -lt "${deadline}" ] || die "${what}: not within ${seconds} s"
        sleep 0.2
    done
}

[ "$(id -u)" -eq 0 ] || die "run as root (podman builds and runs the image as root here): sudo bash .ci/image.sh"
if [ -n "${CARGO_TARGET_DIR:-}" ] && [ "$(realpath -m "${CARGO_TARGET_DIR}")" != "$(realpath -m target)" ]; then
    die "CARGO_TARGET_DIR points outside ./target; the Dockerfile takes the binary from target/production"
fi

# ---- tools: Debian's packages only --------------------------------------------------------------
say "tools"
missing=()
for tool in podman runc debootstrap curl python3; do
    command -v "${tool}" >/dev/null || missing+=("${tool}")
done
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# crun fails on this kernel's cgroup mode, and podman's default nofile ulimit is above the hard
# limit root may set here (runc: "error setting rlimits ... operation not permitted").
conf=/etc/containers/containers.conf
marker="# written by calsync .ci/image.sh"
if [ -e "${conf}" ] && ! grep -qF "${marker}" "${conf}"; then
    if ! grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=[[:space:]]*\[[[:space:]]*\]' "${conf}" \
        || ! grep -Eq '^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"runc"' "${conf}"; then
        die "${conf} exists and is not ours: it needs default_ulimits = [] under [containers] and runtime = \"runc\" under [engine]"
    fi
else
    mkdir -p /etc/containers
    printf '%s\n[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' "${marker}" >"${conf}"
fi
runtime="$(podman info --format '{{.Host.OCIRuntime.Name}}')"
[ "${runtime}" = runc ] || die "podman uses the ${runtime} runtime, not runc"
echo "$(podman --version), $(runc --version | head -n 1), $(debootstrap --version)"

# ---- the runtime stage's base image --------------------------------------------------------------
# Whatever the runtime stage (the Dockerfile's last FROM) names, a debootstrapped bookworm stands in.
base_image="$(awk 'toupper($1) == "FROM" { image = $2 } END { print image }' Dockerfile)"
case "${base_image}" in
    debian:12*) ;;
    *) die "the runtime stage is FROM ${base_image}; this script makes a Debian 12 (bookworm) base only" ;;
esac
say "base image ${base_image} (debootstrap --variant=minbase bookworm)"
mkdir -p "${CACHE_DIR}"
tarball="${CACHE_DIR}/debian-bookworm-minbase-slim.tar"
if [ -f "${tarball}" ] && [ -n "$(find "${tarball}" -mtime +30)" ]; then
    echo "the cached base is older than 30 days: making it again (security updates)"
    rm -f "${tarball}"
fi
if [ ! -f "${tarball}" ]; then
    rootfs="$(mktemp -d /var/tmp/calsync-rootfs.XXXXXX)"
    debootstrap --variant=minbase bookworm "${rootfs}" "${MIRROR}" >"${work}/debootstrap.log" 2>&1 \
        || { tail -n 30 "${work}/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # What Debian's -slim images leave out, and their apt settings; sources as in the official image.
    cat >"${rootfs}/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    cat >"${rootfs}/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"${rootfs}/etc/apt/apt.conf.d/docker-no-languages"
    rm -f "${rootfs}/etc/apt/sources.list"
    cat >"${rootfs}/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${SECURITY_MIRROR}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    find "${rootfs}/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "${rootfs}/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "${rootfs}"/usr/share/{groff,info,linda,lintian,locale,man}/* \
        "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/var/cache/apt/* "${rootfs}"/var/log/* \
        "${rootfs}/etc/resolv.conf" "${rootfs}/etc/hostname"
    tar --numeric-owner -C "${rootfs}" -cf "${tarball}.tmp" .
    mv "${tarball}.tmp" "${tarball}"
    rm -rf "${rootfs}"
    rootfs=""
fi
# The import is labelled with its tarball, so a new tarball replaces the image and an unchanged
# one keeps it (and with it podman's cache of the apt layer built on it).
base_sum="$(sha256sum "${tarball}" | cut -c 1-64)"
if [ "$(podman image inspect --format '{{index .Labels "calsync.ci.base-tarball"}}' "${base_image}" 2>/dev/null)" != "${base_sum}" ]; then
    podman import --quiet --change 'CMD ["bash"]' --change "LABEL calsync.ci.base-tarball=${base_sum}" \
        "${tarball}" "${base_image}" >/dev/null
    echo "imported ${tarball}"
else
    echo "reusing the imported ${base_image}"
fi
podman run --rm --pull=never "${base_image}" sh -c 'echo "Debian $(cat /etc/debian_version)"'

# ---- binaries ------------------------------------------------------------------------------------
say "production binary (cargo build --profile production --no-default-features --bin calsync)"
cargo build --profile production --locked --no-default-features --bin calsync
binary=target/production/calsync
binary_size="$(stat -c %s "${binary}")"
echo "${binary}: ${binary_size} bytes"
# The simulator comes from the lab build (default features), which the production binary lacks.
sim_bin="${CALSYNC_SIM_BIN:-target/debug/calsync}"
if [ -z "${CALSYNC_SIM_BIN:-}" ]; then
    say "simulator (cargo build --bin calsync)"
    cargo build --locked --bin calsync
fi
"${sim_bin}" sim --help >/dev/null || die "${sim_bin} has no \`sim\` command"

# ---- the image -----------------------------------------------------------------------------------
say "image ${IMAGE} (podman build --format docker: the OCI format drops HEALTHCHECK)"
previous="$(podman image inspect --format '{{.Id}}' "${IMAGE}" 2>/dev/null || true)"
podman build --format docker --pull=never --build-arg CALSYNC_BINARY=context --tag "${IMAGE}" .
image_id="$(podman image inspect --format '{{.Id}}' "${IMAGE}")"
# Keep podman's storage from growing with every new binary: the replaced image (with its own
# layers) and the context stage's image go; the base and the apt layer stay cached.
if [ -n "${previous}" ] && [ "${previous}" != "${image_id}" ]; then
    podman rmi "${previous}" >/dev/null 2>&1 || true
fi
podman image prune --force --filter label=calsync.stage=context >/dev/null
podman image inspect "${IMAGE}" >"${work}/image.json"
python3 - "${work}/image.json" <<'PY'
import json, sys
[image] = json.load(open(sys.argv[1]))
c = image["Config"]
expect = {
    "ManifestType": "application/vnd.docker.distribution.manifest.v2+json",
    "User": "10001:10001",
    "Entrypoint": ["calsync"],
    "Cmd": ["serve"],
    "Healthcheck.Test": ["CMD", "calsync", "health"],
    "ExposedPorts": ["8080/tcp", "8081/tcp"],
    "Volumes": ["/data"],
}
got = {
    "ManifestType": image.get("ManifestType"),
    "User": c.get("User"),
    "Entrypoint": c.get("Entrypoint"),
    "Cmd": c.get("Cmd"),
    "Healthcheck.Test": (image.get("Healthcheck") or {}).get("Test"),
    "ExposedPorts": sorted(c.get("ExposedPorts") or {}),
    "Volumes": sorted(c.get("Volumes") or {}),
}
bad = [f"{k}: expected {expect[k]!r}, got {got[k]!r}" for k in expect if got[k] != expect[k]]
if bad:
    sys.exit("image configuration: " + "; ".join(bad))
PY
host_sum="$(sha256sum "${binary}" | cut -c 1-64)"
image_sum="$(podman run --rm --pull=never --no-healthcheck --entrypoint sha256sum "${IMAGE}" /usr/local/bin/calsync | cut -c 1-64)"
[ "${image_sum}" = "${host_sum}" ] || die "the image's calsync is not the host-built ${binary}"
echo "config: user 10001, HEALTHCHECK calsync health, ports 8080 8081, volume /data; binary = ${binary}"
# Once the lab (demo, drill, bench, sim) is a cargo feature, the image must be without it.
lab_commands="$(podman run --rm --pull=never --no-healthcheck "${IMAGE}" --help \
    | grep -Eo '^  (demo|drill|bench|sim) ' | xargs || true)"
if cargo metadata --no-deps --format-version 1 --locked \
    | python3 -c 'import json, sys; sys.exit(not any("lab" in p["features"] for p in json.load(sys.stdin)["packages"]))'; then
    [ -z "${lab_commands}" ] || die "the image's calsync has the lab commands ${lab_commands}"
    echo "no lab commands in the image"
else
    echo "note: no cargo feature \`lab\` yet, so the image still has the lab commands ${lab_commands}"
fi

# ---- the simulator on the host -------------------------------------------------------------------
say "simulator on the host (${TENANTS} tenants x ${MAILBOXES} mailboxes)"
: >"${work}/sim.log"
"${sim_bin}" sim --listen 127.0.0.1:0 --tenants "${TENANTS}" --mailboxes "${MAILBOXES}" \
    --events 30 --seed 12 >"${work}/sim.log" 2>&1 &
sim_pid=$!
sim_ready() {
    kill -0 "${sim_pid}" 2>/dev/null || die "the simulator exited"
    [ "$(grep -c '^tenant ' "${work}/sim.log")" -eq "${TENANTS}" ]
}
wait_for "the simulator printing its tenants" "${READY_TIMEOUT}" sim_ready
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
api_port="$(free_port)"
public_port="$(free_port)"

# The container's whole configuration: CALSYNC_* variables (in a file, so secrets stay off argv).
env_file="${work}/calsync.env"
secrets=()
(
    umask 077
    {
        echo "CALSYNC_SERVER__LISTEN=127.0.0.1:${api_port}"
        echo "CALSYNC_SERVER__PUBLIC_LISTEN=127.0.0.1:${public_port}"
        echo "CALSYNC_SERVER__SHUTDOWN_GRACE=${GRACE_SECONDS}s"
        echo "CALSYNC_GRAPH__AUTHORITY=$(sed -n 's/^authority: *//p' "${work}/sim.log")"
        echo "CALSYNC_GRAPH__BASE_URL=$(sed -n 's/^graph base url: *//p' "${work}/sim.log")"
    } >"${env_file}"
)
index=0
while read -r _ name fields; do
    echo "CALSYNC_TENANTS__${index}__NAME=${name%:}" >>"${env_file}"
    for field in ${fields}; do
        key="${field%%=*}"
        value="${field#*=}"
        case "${key}" in
            tenant_id | client_id | client_secret | mailboxes) ;;
            *) die "unexpected field ${key} in the simulator's tenant line" ;;
        esac
        [ "${key}" != client_secret ] || secrets+=("${value}")
        echo "CALSYNC_TENANTS__${index}__${key^^}=${value}" >>"${env_file}"
    done
    index=$((index + 1))
done < <(grep '^tenant ' "${work}/sim.log")
[ "${#secrets[@]}" -eq "${TENANTS}" ] || die "found ${#secrets[@]} client secrets in the simulator's output"

# ---- the container -------------------------------------------------------------------------------
say "container: serve on the simulator"
volume="calsync-ci-$$"
container="calsync-ci-$$"
podman volume create "${volume}" >/dev/null
# Host network: Graph over plain http:// is accepted only on loopback, and the simulator is on the
# host's loopback (docker-compose shares the simulator's network namespace for the same reason).
# Without systemd, podman logs that it cannot schedule the HEALTHCHECK timer; the check itself
# runs below with `podman healthcheck run`.
echo "(without systemd, podman logs errors about the HEALTHCHECK timer: expected here)"
podman run --detach --pull=never --name "${container}" --network host --read-only \
    --env-file "${env_file}" --volume "${volume}:/data" "${IMAGE}" >/dev/null
started_at=${SECONDS}
synced() {
    [ "$(podman inspect --format '{{.State.Running}}' "${container}")" = true ] \
        || die "the container exited with $(podman inspect --format '{{.State.ExitCode}}' "${container}")"
    curl -fsS --max-time 5 "http://127.0.0.1:${api_port}/healthz" -o "${work}/healthz.json" 2>/dev/null || return 1
    python3 - "${work}/healthz.json" "$((TENANTS * MAILBOXES))" <<'PY'
import json, sys
h = json.load(open(sys.argv[1]))
synced = [m for t in h["tenants"] for m in t["mailbox_detail"] if m["last_success_at"]]
sys.exit(0 if h["status"] == "ok" and len(synced) == int(sys.argv[2]) else 1)
PY
}
wait_for "every mailbox synced and /healthz ok" "${SYNC_TIMEOUT}" synced
echo "all $((TENANTS * MAILBOXES)) mailboxes synced $((SECONDS - started_at)) s after start"

say "HEALTHCHECK"
podman healthcheck run "${container}" || die "podman healthcheck run: the image's HEALTHCHECK failed"
health="$(podman inspect --format '{{.State.Health.Status}}' "${container}")"
[ "${health}" = healthy ] || die "health status is ${health}"
said="$(podman exec "${container}" calsync health)"
[ "${said}" = ok ] || die "calsync health in the container said ${said}"
echo "podman healthcheck run: ${health}; calsync health: ${said}"

say "user, /data, logs, secrets"
pid="$(podman inspect --format '{{.State.Pid}}' "${container}")"
[ "$(cat "/proc/${pid}/comm")" = calsync ] || die "the container's first process is $(cat "/proc/${pid}/comm"), not calsync"
read -r _ ruid euid suid fsuid < <(grep '^Uid:' "/proc/${pid}/status")
read -r _ rgid egid sgid fsgid < <(grep '^Gid:' "/proc/${pid}/status")
[ "${ruid}/${euid}/${suid}/${fsuid}" = 10001/10001/10001/10001 ] || die "calsync runs as UID ${ruid}/${euid}/${suid}/${fsuid}"
[ "${rgid}/${egid}/${sgid}/${fsgid}" = 10001/10001/10001/10001 ] || die "calsync runs as GID ${rgid}/${egid}/${sgid}/${fsgid}"
db="$(podman exec "${container}" stat -c '%u %s' /data/calsync.db)" || die "no /data/calsync.db"
if [ "${db%% *}" != 10001 ] || [ "${db#* }" -le 0 ]; then die "/data/calsync.db: owner and size ${db}"; fi
podman logs "${container}" >"${work}/container.log" 2>&1
python3 - "${work}/container.log" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert lines, "the container logged nothing"
for n, line in enumerate(lines, 1):
    try:
        json.loads(line)
    except ValueError:
        sys.exit(f"container log line {n} is not JSON: {line[:120]!r}")
PY
for secret in "${secrets[@]}"; do
    ! grep -qF "${secret}" "${work}/container.log" "${work}/healthz.json" \
        || die "a client secret appears in the container's log or /healthz"
done
echo "PID 1 is calsync, UID/GID 10001; /data/calsync.db owned by 10001, ${db#* } bytes; JSON logs without secrets"

say "SIGTERM (podman stop; server.shutdown_grace = ${GRACE_SECONDS}s)"
stop_started="$(date +%s%N)"
podman stop --time $((GRACE_SECONDS + 20)) "${container}" >/dev/null
stop_ms=$((($(date +%s%N) - stop_started) / 1000000))
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "${container}")"
[ "${exit_code}" = 0 ] || die "exit code ${exit_code} after SIGTERM"
[ "${stop_ms}" -lt $((GRACE_SECONDS * 1000)) ] || die "SIGTERM took ${stop_ms} ms, over server.shutdown_grace"
podman logs --tail 1 "${container}" 2>&1 | grep -q '"calsync stopped"' || die "no \"calsync stopped\" in the last log line"
echo "stopped in ${stop_ms} ms, exit code ${exit_code}"
# What the container wrote, read back from the volume after a clean stop.
mkdir "${work}/data"
cp -a "$(podman volume inspect --format '{{.Mountpoint}}' "${volume}")/." "${work}/data/"
python3 - "${work}/data/calsync.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
events = db.execute("SELECT count(*) FROM events").fetchone()[0]
assert events > 0, "no events in /data/calsync.db"
print(f"/data/calsync.db holds {events} events")
PY

# ---- figures -------------------------------------------------------------------------------------
say "sizes and time"
image_size="$(podman image inspect --format '{{.Size}}' "${IMAGE}")"
base_size="$(podman image inspect --format '{{.Size}}' "${base_image}")"
awk -v b="${binary_size}" -v i="${image_size}" -v d="${base_size}" 'BEGIN {
    printf "production binary %d bytes (%.1f MiB)\n", b, b / 1048576
    printf "image             %d bytes (%.1f MiB; base %.1f MiB)\n", i, i / 1048576, d / 1048576
}'
echo "image check passed in ${SECONDS} s"
