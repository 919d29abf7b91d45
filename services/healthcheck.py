"""A container health check: asks a server's standard gRPC health service whether it is SERVING.

    python -m services.healthcheck ADDRESS [SERVICE]
    python -m services.healthcheck http://HOST:PORT/health

exits 0 when the answer is SERVING and 1 otherwise (NOT_SERVING, an unknown service, a
refused connection, no answer within the timeout), printing one line that says which.
SERVICE defaults to "", the server as a whole. An http:// URL (the HTTP gateway's /health)
is healthy when it answers 200.

Why this exists: docker-compose has no native gRPC health check, and shipping the
`grpc_health_probe` binary would mean downloading one at build time. The image already has
grpcio, so this costs nothing. Kubernetes probes are native `grpc:` probes; there it only
serves the orchestrator's initContainer, which waits for the verifier.

Examples (exit status in brackets):

    $ python -m services.healthcheck 127.0.0.1:50051            [0]
    127.0.0.1:50051 (overall): SERVING
    $ python -m services.healthcheck 127.0.0.1:50051 specd.X    [1]
    127.0.0.1:50051 (specd.X): NOT_FOUND
    $ python -m services.healthcheck 127.0.0.1:1                [1]
    127.0.0.1:1 (overall): UNAVAILABLE: failed to connect to all addresses; ...
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Under a compose healthcheck's own timeout, so a hung server reads as unhealthy, not as a hung check.
TIMEOUT_SECONDS = 2.0


def check(address: str, service: str = "", timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Asks `address` once for the health of `service`; returns (serving, a line saying what was found).

    No wait_for_ready: a closed port must fail at once, not after the whole timeout.
    """
    label = f"{address} ({service or 'overall'})"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            details = f": {err.details()}" if err.details() else ""
            return False, f"{label}: {err.code().name}{details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{label}: {status}"


def check_http(url: str, timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """GETs `url` once; healthy on 200."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200, f"{url}: {reply.status}"
    except urllib.error.HTTPError as err:
        return False, f"{url}: {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return False, f"{url}: {getattr(err, 'reason', err)}"


def probe(address: str, service: str = "", timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """`check_http` for an http(s):// URL, `check` for a gRPC host:port."""
    if address.startswith(("http://", "https://")):
        return check_http(address, timeout)
    return check(address, service, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.healthcheck",
        description="Exit 0 if the gRPC server at ADDRESS reports SERVICE as SERVING, 1 otherwise.",
    )
    parser.add_argument("address", metavar="ADDRESS", help="host:port of the gRPC server, or an http:// URL")
    parser.add_argument("service", metavar="SERVICE", nargs="?", default="", help='service name (default "": overall)')
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_SECONDS,
        help=f"seconds to wait for an answer (default {TIMEOUT_SECONDS:g})",
    )
    args = parser.parse_args(argv)
    serving, line = probe(args.address, args.service, args.timeout)
    print(line, file=sys.stdout if serving else sys.stderr, flush=True)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
