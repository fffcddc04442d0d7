"""The health state machine, pure: a probe result or a proxy outcome in, maybe a transition out.

    healthy --fail--> failing (1..fall-1 failures, still in rotation) --fall-th fail--> cooldown
    failing --pass--> healthy
    cooldown: out of rotation, not probed until the cooldown ends; then probed each interval:
        rise consecutive passes --> healthy; a failed probe --> degraded (cooldown doubles)
    degraded: out of rotation, kept and shown; probed after each (doubling, capped) cooldown:
        rise consecutive passes --> healthy
    passive: `passive_fall` consecutive failed requests (1 for a refused connection) --> cooldown at
        once, unless that would leave fewer than `panic_threshold` of the region in rotation.

Times are seconds on a monotonic clock, passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lbd.config import HealthSettings
from lbd.models import Health, Outcome, ServerState

PASSIVE_FAILURES = frozenset({Outcome.CONNECT_FAILED, Outcome.RESET, Outcome.TIMEOUT, Outcome.BAD_RESPONSE})


@dataclass(frozen=True, slots=True)
class Transition:
    old: Health
    new: Health
    reason: str


def probe_due(state: ServerState, now: float) -> bool:
    """Servers in cooldown or degraded are left alone until their cooldown ends."""
    return not state.health_in_cooldown or now >= state.cooldown_until


def end_cooldown(state: ServerState, now: float) -> bool:
    """An operator's `lbctl check`: a server in cooldown or degraded is probed from now on instead of
    after its cooldown (it still needs `rise` passes to return). Whether it was waiting."""
    if not state.health_in_cooldown or state.cooldown_until <= now:
        return False
    state.cooldown_until = now
    return True


def after_probe(
    state: ServerState, ok: bool, detail: str, started: float, now: float, settings: HealthSettings
) -> Transition | None:
    """Count one active check and return the transition it causes, if any.

    A check sent before its server's cooldown began (it was in flight when a request's failure
    ejected the server) is shown and counted, but moves nothing: it is not the check after the
    cooldown, so its failure must not make the server `degraded` and double the cooldown, nor its
    pass count towards `rise`."""
    state.last_check_ok = ok
    state.last_check_detail = detail
    if ok:
        state.checks_passed += 1
    else:
        state.checks_failed += 1
    if state.health_in_cooldown and started < state.cooldown_until:
        return None
    if ok:
        state.consecutive_failures = 0
        state.consecutive_passes += 1
        if state.health is Health.FAILING:
            return _move(state, Health.HEALTHY, "check passed", now)
        if state.health_in_cooldown and state.consecutive_passes >= settings.rise:
            state.cooldown_ms = 0
            return _move(state, Health.HEALTHY, f"{state.consecutive_passes} checks passed", now)
        return None
    state.consecutive_passes = 0
    state.consecutive_failures += 1
    if state.health_in_cooldown:
        # Probed after its cooldown and failed again: keep it out, back off harder.
        return _start_cooldown(state, Health.DEGRADED, f"check failed after cooldown: {detail}", now, settings)
    if state.consecutive_failures >= settings.fall:
        return _start_cooldown(
            state, Health.COOLDOWN, f"{state.consecutive_failures} checks failed: {detail}", now, settings
        )
    if state.health is Health.HEALTHY:
        return _move(state, Health.FAILING, f"check failed: {detail}", now)
    return None


def after_outcome(
    state: ServerState, outcome: Outcome, now: float, settings: HealthSettings, may_eject: Callable[[], bool]
) -> Transition | None:
    """Passive outlier detection from what the proxy saw on a real request.

    `may_eject` (the panic guard, which looks at the whole region) is asked only when this failure
    would eject the server, so ordinary error responses cost no scan."""
    failed = outcome in PASSIVE_FAILURES or (settings.passive_5xx and outcome is Outcome.STATUS_5XX)
    if not failed:
        if outcome is not Outcome.CLIENT_ABORTED:
            state.passive_failures = 0
        return None
    state.passive_failures += 1
    threshold = 1 if outcome is Outcome.CONNECT_FAILED else settings.passive_fall
    if state.passive_failures < threshold or not state.health.serving or not may_eject():
        return None
    state.passive_failures = 0
    return _start_cooldown(state, Health.COOLDOWN, f"{threshold} request(s) failed: {outcome.value}", now, settings)


def _start_cooldown(
    state: ServerState, health: Health, reason: str, now: float, settings: HealthSettings
) -> Transition | None:
    if state.cooldown_ms == 0:
        state.cooldown_ms = settings.cooldown_ms
    else:
        state.cooldown_ms = min(state.cooldown_ms * 2, settings.max_cooldown_ms)
    state.cooldown_until = now + state.cooldown_ms / 1000.0
    state.consecutive_passes = 0
    if health is Health.COOLDOWN and state.health_in_cooldown:
        return None
    state.ejections += 1 if state.health.serving else 0
    return _move(state, health, reason, now)


def _move(state: ServerState, health: Health, reason: str, now: float) -> Transition | None:
    if state.health is health:
        return None
    transition = Transition(state.health, health, reason)
    state.health = health
    state.last_transition_at = now
    state.last_transition_reason = reason
    return transition
