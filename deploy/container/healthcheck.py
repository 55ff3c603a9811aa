#!/usr/bin/env python3
"""The container's HEALTHCHECK: exit 0 if the daemon's /healthz answers 200, else 1.

The address is the config's `metrics.listen` (the same file and environment the daemon
reads: $RQ_RECONCILER_CONFIG); a wildcard host (0.0.0.0, ::) is asked on loopback.
$RQ_RECONCILER_HEALTHZ_URL, if set, is used as it is. No curl in a slim image: Python's
standard library only, plus the package's own config loader.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def url() -> str:
    explicit = os.environ.get("RQ_RECONCILER_HEALTHZ_URL")
    if explicit:
        return explicit
    from reconciler.config import load

    host, port = load(missing_ok=True).metrics.host_port
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    try:
        target = url()
    except Exception as exc:  # a config the daemon could not start with either
        print(f"rq-reconciler-healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(target, timeout=4) as resp:  # noqa: S310 (loopback http)
            return 0 if resp.status == 200 else 1
    except OSError as exc:  # refused, timed out, or HTTP 503 (urllib raises for it)
        print(f"{target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
