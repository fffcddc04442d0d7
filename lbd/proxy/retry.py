"""Whether a failed attempt is tried again, and where: a pure decision (sans-I/O, like h11).

A request is sent again only when that cannot make a server act on it twice, and only while nothing
of a response has reached the client and every request byte so far is kept:
- nothing was sent (the connection was refused or never opened): any request, on a backup server;
- something may have reached the server's application: only an idempotent method (RFC 9110 §9.2.2;
  nginx's default `proxy_next_upstream`, HAProxy's `retry-on conn-failure`); an idempotent request
  reset on a reused pooled connection (which the server may have closed as idle just as it arrived)
  first on a new connection to the same server, else on a backup;
- never after a timeout once the request was sent (the deadline was the request's budget, as
  Envoy's route timeout), nor after a malformed response (the server did answer).
Each kind of retry happens at most once per request.
"""

from __future__ import annotations

from typing import Final

from lbd.models import Outcome

FAIL: Final = 0  # answer the client with failure_status(outcome)
RETRY_SAME_SERVER: Final = 1  # on a new connection to the same server
RETRY_BACKUP: Final = 2  # on another server (the client's session moves there)


def decide(
    outcome: Outcome,
    *,
    sent: bool,
    reused: bool,
    idempotent: bool,
    replayable: bool,
    retried_same: bool,
    retried_backup: bool,
) -> int:
    """`sent`: a byte of the request may have reached the server; `reused`: over a pooled connection;
    `replayable`: no response byte reached the client and the request so far is kept whole."""
    if not replayable or outcome is Outcome.BAD_RESPONSE or outcome is Outcome.CLIENT_ABORTED:
        return FAIL
    if sent:
        if outcome is Outcome.TIMEOUT or not idempotent:
            return FAIL
        if outcome is Outcome.RESET and reused and not retried_same:
            return RETRY_SAME_SERVER
    return FAIL if retried_backup else RETRY_BACKUP


def failure_status(outcome: Outcome) -> int:
    """The status lbd answers a failed request with: 504 for a silent server, else 502."""
    return 504 if outcome is Outcome.TIMEOUT else 502
