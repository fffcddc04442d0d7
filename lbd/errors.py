"""Errors that carry a message meant for a person, never a traceback."""

from __future__ import annotations


class LbError(Exception):
    """Base of every error lbd reports to a user: the message is the whole story."""


class ConfigError(LbError):
    """A config file, flag or servers.json is wrong; the message names the place and the field."""


class ValidationError(LbError):
    """One server entry (from a file or the admin API) is wrong.

    `field` is the offending key so the admin API can return it in its error envelope.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class StoreUnavailable(LbError):
    """The cluster's shared store does not answer: a change cannot be made everywhere, so it is not
    made at all (the admin API answers 503 store_unavailable). `cause` is what went wrong, alone."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class StoreConflict(LbError):
    """The cluster's store holds a registration of this id with other settings (409 conflict)."""


class NotPossibleHere(LbError):
    """A change this deployment cannot make (dynamic mode across workers without a session store):
    refused with 409 and `code`, nothing changed."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code
