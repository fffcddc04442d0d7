"""The proxy's pure decisions, without processes: when a failed attempt is retried (lbd.proxy.retry),
and how a response is framed for its client (lbd.proxy.framing)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbd.models import Outcome
from lbd.proxy import retry
from lbd.proxy.framing import (
    CHUNK_FOR_CLIENT,
    CLOSE_AFTER,
    DECHUNK,
    FORWARD_CHUNKED,
    KEEP_ALIVE_10,
    for_client,
)
from lbd.proxy.response import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE

FAILURES = [outcome for outcome in Outcome if outcome is not Outcome.OK]
facts = st.fixed_dictionaries(
    {
        "sent": st.booleans(),
        "reused": st.booleans(),
        "idempotent": st.booleans(),
        "replayable": st.booleans(),
        "retried_same": st.booleans(),
        "retried_backup": st.booleans(),
    }
)


@given(st.sampled_from(FAILURES), facts)
def test_a_request_a_server_may_have_processed_is_retried_only_when_idempotent(outcome: Outcome, f: dict) -> None:
    decision = retry.decide(outcome, **f)
    if f["sent"] and not f["idempotent"]:
        assert decision == retry.FAIL


@given(st.sampled_from(FAILURES), facts)
def test_nothing_is_retried_once_a_response_byte_left_or_the_body_is_lost(outcome: Outcome, f: dict) -> None:
    if not f["replayable"]:
        assert retry.decide(outcome, **f) == retry.FAIL


@given(st.sampled_from(FAILURES), facts)
def test_each_kind_of_retry_happens_at_most_once(outcome: Outcome, f: dict) -> None:
    decision = retry.decide(outcome, **f)
    assert not (decision == retry.RETRY_SAME_SERVER and f["retried_same"])
    assert not (decision == retry.RETRY_BACKUP and f["retried_backup"])


@given(facts)
def test_a_sent_request_that_timed_out_or_got_a_malformed_answer_is_not_retried(f: dict) -> None:
    assert retry.decide(Outcome.BAD_RESPONSE, **f) == retry.FAIL
    if f["sent"]:
        assert retry.decide(Outcome.TIMEOUT, **f) == retry.FAIL


def test_the_usual_cases() -> None:
    fresh = {"retried_same": False, "retried_backup": False, "replayable": True}
    # refused: nothing was sent, so even a POST goes to a backup
    assert retry.decide(Outcome.CONNECT_FAILED, sent=False, reused=False, idempotent=False, **fresh) == 2
    # the keep-alive race on a pooled connection: same server, new connection
    assert retry.decide(Outcome.RESET, sent=True, reused=True, idempotent=True, **fresh) == 1
    # a reset on a new connection: the server was reachable and then failed, so a backup
    assert retry.decide(Outcome.RESET, sent=True, reused=False, idempotent=True, **fresh) == 2
    # a POST a server read and reset on: never again
    assert retry.decide(Outcome.RESET, sent=True, reused=True, idempotent=False, **fresh) == 0
    # a connect timeout is retried; a silent server after the request is not
    assert retry.decide(Outcome.TIMEOUT, sent=False, reused=False, idempotent=False, **fresh) == 2
    assert retry.decide(Outcome.TIMEOUT, sent=True, reused=False, idempotent=True, **fresh) == 0
    assert retry.failure_status(Outcome.TIMEOUT) == 504 and retry.failure_status(Outcome.RESET) == 502


framings = st.sampled_from([NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE])


@given(framings, st.booleans(), st.booleans())
def test_every_response_tells_its_client_where_it_ends(framing: int, http11: bool, reusable: bool) -> None:
    """A body that ends with the server's connection reaches a client either chunked by lbd or
    followed by the close; an HTTP/1.0 client never gets chunked framing."""
    flags = for_client(framing, http11, reusable)
    if framing == UNTIL_CLOSE:
        assert flags & (CHUNK_FOR_CLIENT | CLOSE_AFTER)
    if not http11:
        assert not flags & (FORWARD_CHUNKED | CHUNK_FOR_CLIENT)
    if framing == CHUNKED:
        assert bool(flags & FORWARD_CHUNKED) == http11 and bool(flags & DECHUNK) == (not http11)


@given(framings, st.booleans(), st.booleans())
def test_the_client_connection_stays_only_when_it_can(framing: int, http11: bool, reusable: bool) -> None:
    flags = for_client(framing, http11, reusable)
    if not reusable:
        assert flags & CLOSE_AFTER
    assert not (flags & CLOSE_AFTER and flags & KEEP_ALIVE_10)
    if reusable and framing in (NO_BODY, LENGTH):
        assert not flags & CLOSE_AFTER and bool(flags & KEEP_ALIVE_10) == (not http11)
