#!/usr/bin/env bash
# Build the image of deploy/container/Containerfile on a machine that reaches no container
# registry (only Debian's package mirror and PyPI), with podman + buildah, as root.
#
#   deploy/container/build-local.sh [IMAGE]        (default localhost/rq-reconciler:local)
#
# What differs from `podman build -f deploy/container/Containerfile .` with a registry:
#
# - The base image. python:3.12-slim cannot be pulled, so a stand-in is made once and
#   kept as localhost/rq-reconciler-pybase:bookworm: `buildah from scratch`, then
#   `debootstrap --variant=minbase` of Debian 12 (bookworm) into it with Debian's own
#   python3 (3.11, at /usr/bin, `python` from python-is-python3, venv from python3-venv)
#   instead of the official image's Python 3.12 built into /usr/local; docs, man pages,
#   locales and apt's caches are removed. It is passed as the Containerfile's
#   PYTHON_IMAGE build argument. The project supports Python >= 3.11, so both bases run it.
# - The build context is a staged copy of exactly what the Containerfile reads (the same
#   list as Containerfile.dockerignore), so a local .venv is never sent to the build.
# - `--network host` for the build step's pip (it fetches the dependencies' wheels from
#   PyPI), `--pull=never` (nothing is ever asked of a registry). If the host's pip
#   trusts a CA of its own (pip's `cert` setting: a proxy that intercepts TLS), that
#   bundle is mounted into the build step and passed as the PIP_CERT build argument.
# - Where the machine needs it (see local_runtime_opts below): runc as the OCI runtime
#   and explicit rlimits. crun 1.8 refuses a hybrid cgroup layout (cgroup v1 controllers
#   plus a cgroup2 mount with a controller enabled: "cgroups in hybrid mode not
#   supported"), and a root without CAP_SYS_RESOURCE cannot raise the rlimits to podman's
#   defaults (nofile 1048576: "setrlimit RLIMIT_NOFILE: Operation not permitted").
# Everything else (both stages, the user, the environment, HEALTHCHECK, ENTRYPOINT/CMD)
# is the Containerfile itself, unchanged.
#
# Environment: IMAGE_UID, IMAGE_GID (the image's user, default 10001: build it as the
# workers' uid; bash reserves UID itself),
# DEBIAN_MIRROR (default: the first deb.debian.org-style URI in apt's sources, else
# http://deb.debian.org/debian), REBUILD_BASE=1 to make the base again.
set -euo pipefail

log() { printf 'build-local: %s\n' "$*" >&2; }

IMAGE=${1:-localhost/rq-reconciler:local}
BASE=localhost/rq-reconciler-pybase:bookworm
SUITE=bookworm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# The podman options this machine needs, one a line (also printed by
# `build-local.sh --print-opts` for callers such as tests/deploy/test_container.py; they go
# before the subcommand: `podman $(build-local.sh --print-opts) run ...`).
local_opts() {
    # runc where installed: it runs under any cgroup layout crun may refuse.
    if command -v runc >/dev/null 2>&1; then printf '%s\n' --runtime runc; fi
}
# ...and the ones `podman build` / `podman run` take after the subcommand.
local_run_opts() {
    local capeff
    capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
    if (( ((16#$capeff) >> 24) & 1 )); then return; fi  # CAP_SYS_RESOURCE held: defaults work
    local n; n=$(ulimit -Hn)
    printf '%s\n' --ulimit "nofile=$n:$n" --ulimit "nproc=4096:4096"
}

case ${1:-} in
    --print-opts) local_opts; exit 0 ;;
    --print-run-opts) local_run_opts; exit 0 ;;
esac

for tool in podman buildah debootstrap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool is missing (apt-get install podman buildah debootstrap)"; exit 1
    fi
done
if [[ $(id -u) -ne 0 ]]; then
    log "run as root (debootstrap and a rootful podman store)"; exit 1
fi

mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
          | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -n 1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
    local ctr mnt
    log "making $BASE with debootstrap ($SUITE, $(mirror))"
    ctr=$(buildah from scratch)
    trap 'buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true' RETURN
    mnt=$(buildah mount "$ctr")
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$mnt" "$(mirror)" >/dev/null
    rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/* \
           "$mnt"/usr/share/doc/* "$mnt"/usr/share/man/* "$mnt"/usr/share/locale/* \
           "$mnt"/var/log/*.log "$mnt"/var/cache/debconf/*-old
    buildah umount "$ctr" >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd python3 \
        --label org.opencontainers.image.description="Debian $SUITE minbase + python3 (debootstrap)" \
        "$ctr"
    buildah commit --quiet "$ctr" "$BASE" >/dev/null
}

if [[ ${REBUILD_BASE:-0} == 1 ]] || ! podman image exists "$BASE"; then
    make_base
else
    log "reusing $BASE"
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/rq-reconciler-ctx.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/deploy/container"
cp "$REPO/pyproject.toml" "$REPO/README.md" "$ctx/"
cp -r "$REPO/reconciler" "$ctx/reconciler"
find "$ctx/reconciler" -name __pycache__ -prune -exec rm -rf {} +
cp "$HERE/healthcheck.py" "$ctx/deploy/container/healthcheck.py"

# The CA bundle the host's pip is configured with, if any (a TLS-intercepting proxy).
CERT_OPTS=()
cert=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'\$/\1/p" | head -n 1)
cert=${PIP_CERT:-$cert}
if [[ -n $cert && -r $cert ]]; then
    CERT_OPTS=(--volume "$cert:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi

log "building $IMAGE"
mapfile -t OPTS < <(local_opts)
mapfile -t RUN_OPTS < <(local_run_opts)
podman "${OPTS[@]}" build --quiet --format docker --pull=never --network host "${RUN_OPTS[@]}" \
    "${CERT_OPTS[@]}" \
    --build-arg PYTHON_IMAGE="$BASE" \
    --build-arg UID="${IMAGE_UID:-10001}" \
    --build-arg GID="${IMAGE_GID:-10001}" \
    -f "$HERE/Containerfile" -t "$IMAGE" "$ctx" >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$IMAGE" | {
    read -r id size; log "built $IMAGE (${id:0:12}, $((size / 1024 / 1024)) MiB)"; }
