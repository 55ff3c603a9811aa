#!/usr/bin/env bash
# Install the external tools tests/test_deploy.py needs, from Debian's packages:
#   promtool        (package `prometheus`)  - check/test the alert rules and the exposition
#   systemd-analyze (package `systemd`)     - verify the unit and score its sandboxing
#   pgbouncer       (package `pgbouncer`)   - tests/integration/test_pooler.py starts its
#                                             own, on a free port (never the service)
#   faketime        (package `faketime`)    - libfaketime, for tests/faults/test_clocks.py
#   podman, buildah, debootstrap, runc      - tests/deploy/test_container.py builds the
#                                             image without a registry
#                                             (deploy/container/build-local.sh) and runs it
#
# Idempotent: a tool already on PATH is left alone, and apt is not touched at all when
# all are present. Needs root (CI and the dev machines run as root).
#
# The `prometheus` package also ships the Prometheus *server* (listens on :9090) and a
# service for it. We only want promtool, so the install runs with a policy-rc.d that
# forbids starting services (Debian's own mechanism, honoured by invoke-rc.d and
# deb-systemd-invoke), then makes sure no server it may have started is left running,
# and disables the service on hosts where systemd is PID 1 so that it does not start at
# the next boot either. Nothing here binds :9090 or :9464 (the daemon's metrics port).
set -euo pipefail

log() { printf 'install-ci-tools: %s\n' "$*" >&2; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        log "not root and no sudo: cannot install packages"; exit 1
    fi
fi

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# Debian installs it in /usr/sbin, which may not be on PATH.
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
for tool in podman buildah debootstrap runc; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
# libfaketime: tests/faults/test_clocks.py steps the daemon's wall clock with it.
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)

if [[ ${#missing[@]} -eq 0 ]]; then
    log "promtool, systemd-analyze, pgbouncer, podman, buildah, debootstrap, runc, libfaketime already present; nothing to do"
else
    log "installing: ${missing[*]}"
    POLICY=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $POLICY ]]; then
        # Forbid service start-up during this install only; removed again on exit.
        printf '#!/bin/sh\n# temporary, from rq-reconciler scripts/install-ci-tools.sh\nexit 101\n' \
            | $SUDO tee "$POLICY" >/dev/null
        $SUDO chmod 0755 "$POLICY"
        made_policy=1
    fi
    cleanup() { if [[ $made_policy -eq 1 ]]; then $SUDO rm -f "$POLICY"; fi; }
    trap cleanup EXIT

    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

    if [[ " ${missing[*]} " == *" prometheus "* ]]; then
        # Belt and braces: if anything started the server anyway, stop it.
        if [[ -d /run/systemd/system ]]; then
            $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        elif [[ -x /etc/init.d/prometheus ]] && pgrep -x prometheus >/dev/null 2>&1; then
            $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        fi
        if pgrep -x prometheus >/dev/null 2>&1; then
            log "warning: a prometheus server is running (pids: $(pgrep -x prometheus | tr '\n' ' '))"
        fi
    fi
    if [[ " ${missing[*]} " == *" podman "* && -d /run/systemd/system ]]; then
        # Only the command is wanted, not its API socket or restart service.
        $SUDO systemctl disable --now podman.socket podman.service podman-restart.service \
            >/dev/null 2>&1 || true
    fi
    if [[ " ${missing[*]} " == *" pgbouncer "* && -d /run/systemd/system ]]; then
        # Only its binary is wanted; its service must not hold :6432 now or after a boot.
        $SUDO systemctl disable --now pgbouncer.service >/dev/null 2>&1 || true
    fi
fi

promtool --version 2>&1 | head -n 1
systemd-analyze --version | head -n 1
{ command -v pgbouncer >/dev/null 2>&1 && pgbouncer --version || /usr/sbin/pgbouncer --version; } | head -n 1
podman --version
buildah --version
