"""TLS on the listener: the certificates (read and checked whole), the choice by SNI, mutual TLS.

One SSLContext is bound to the TLS listener when lbd starts (the "front" context: protocol
versions, ciphers, ALPN, tickets, whether a client certificate is required). Each certificate has
its own context; the front context's SNI callback, run for every ClientHello (with or without a
server name), hands the handshake to the context of the certificate whose subjectAltNames match,
else the default (the first). A reload builds a new `Certificates` (every file read and checked
before anything changes) and swaps it in: new handshakes get the new certificates, open connections
keep theirs. The front context lives as long as the listener, so its session ticket keys do too:
resumption survives reloads, not restarts (the `ssl` module cannot set ticket keys).

What each connection then carries to the servers (`X-Forwarded-Proto: https`, and with mutual TLS
the client's subject in `client_subject_header`) is computed once per connection
(`connection_lines`), never per request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from lbd.config import CertificateFiles, TlsSettings
from lbd.errors import ConfigError

log = logging.getLogger("lbd.tls")

# Mozilla's "intermediate" configuration (TLS 1.2 and 1.3; for 1.2 only AEAD ciphers with forward
# secrecy; the client's preference order, as every suite is strong). Its DHE suites are left out:
# Python's ssl sets no DH parameters, so they could never be chosen. TLS 1.3's suites are OpenSSL's
# defaults, which are that configuration's.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN = ("http/1.1",)  # a client offering h2 (and http/1.1) is answered in HTTP/1.1
HTTPS_LINE = b"X-Forwarded-Proto: https\r\n"
EXPIRY_WARNING_DAYS = 14
EXPIRY_CHECK_PERIOD_S = 3600.0
DAY_S = 86400.0
SUBJECT_CACHE = 1024  # subjects of client certificates seen recently, by their DER bytes


@dataclass(frozen=True)
class Certificate:
    """One loaded certificate: where it came from, the names it answers for, when it expires."""

    file: Path
    key_file: Path
    names: tuple[str, ...]  # subjectAltName DNS names and IP addresses, lower case (the CN if none)
    not_after: float  # Unix time
    fingerprint: str  # SHA-256 of the leaf, hex
    context: ssl.SSLContext = field(compare=False, repr=False)

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / DAY_S

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "file": str(self.file),
            "names": list(self.names),
            "not_after": _iso(self.not_after),
            "days_left": round(self.days_left(now), 1),
        }

    def summary(self) -> str:
        """For the reload's list of changes: the names and the expiry."""
        return f"{', '.join(self.names) or '(no names)'} until {_iso(self.not_after)}"


class Certificates:
    """The certificate set in effect: every certificate's context, found by a client's SNI name."""

    def __init__(self, settings: TlsSettings, certificates: tuple[Certificate, ...]) -> None:
        self.settings = settings
        self.certificates = certificates
        self.default = certificates[0].context
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # "*.example.com" under "example.com"
        for certificate in certificates:  # the first certificate naming a host wins
            for name in certificate.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], certificate.context)
                else:
                    self._exact.setdefault(name, certificate.context)

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context of the certificate for `server_name` (SNI; None when the client sent none)."""
        if server_name is None:
            return self.default
        name = server_name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is None:
            found = self._wildcard.get(name.partition(".")[2], self.default)
        return found

    def changes(self, old: Certificates | None) -> list[tuple[str, str | None, str | None]]:
        """(key, old, new) for each certificate file whose content changed, appeared or went away."""
        before = {} if old is None else {c.file: c for c in old.certificates}
        after = {c.file: c for c in self.certificates}
        changes: list[tuple[str, str | None, str | None]] = []
        for path in dict.fromkeys([*before, *after]):
            was, now = before.get(path), after.get(path)
            if was is None or now is None or was.fingerprint != now.fingerprint:
                changes.append((f"tls.certificate {path}", _summary(was), _summary(now)))
        return changes


def _summary(certificate: Certificate | None) -> str | None:
    return None if certificate is None else certificate.summary()


def load_certificates(settings: TlsSettings, now: float | None = None) -> Certificates | None:
    """Read and check every certificate and key of `[tls]` (None when TLS is off). ConfigError, one
    line naming the file and what is wrong: unreadable, not PEM, an encrypted key, a key that does not
    match its certificate, an expired certificate; or the client CA's problem."""
    if settings.listen is None:
        return None
    when = time.time() if now is None else now
    loaded = tuple(_load_pair(pair, settings, when) for pair in settings.pairs)
    return Certificates(settings, loaded)


def _load_pair(pair: CertificateFiles, settings: TlsSettings, now: float) -> Certificate:
    chain = _certificate_chain(pair.cert)
    leaf = chain[0]
    key = _private_key(pair.key)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    leaf_key = leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != leaf_key:
        raise ConfigError(f"{pair.key}: the key does not match the certificate {pair.cert}")
    names = _names(leaf)
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise ConfigError(f"{pair.cert}: the certificate expired on {_iso(not_after)} ({', '.join(names)})")
    context = server_context(settings)
    try:
        context.load_cert_chain(pair.cert, pair.key)
    except (ssl.SSLError, OSError) as exc:  # checked above; a file changed meanwhile, or OpenSSL's own refusal
        raise ConfigError(f"{pair.cert}: cannot load the certificate and key {pair.key}: {_reason(exc)}") from None
    if settings.client_ca is not None:
        _load_client_ca(context, settings.client_ca)
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    return Certificate(pair.cert, pair.key, names, not_after, fingerprint, context)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _certificate_chain(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{path}: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a valid PEM certificate: {exc}") from None


def _private_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "key")
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{path}: not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the key is encrypted; lbd needs it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a valid PEM private key: {exc}") from None


def _load_client_ca(context: ssl.SSLContext, path: Path) -> None:
    data = _read(path, "client CA")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{path}: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)")
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{path}: not a valid client CA: {_reason(exc)}") from None


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The names a certificate answers for: its subjectAltName DNS names and IP addresses, else its CN."""
    try:
        alt = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(attribute.value).lower() for attribute in common)
    dns = [name.lower() for name in alt.get_values_for_type(x509.DNSName)]
    ips = [str(address) for address in alt.get_values_for_type(x509.IPAddress)]
    return tuple(dict.fromkeys([*dns, *ips]))


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context with lbd's protocol settings: TLS 1.2 and 1.3, Mozilla intermediate, ALPN
    http/1.1, no renegotiation, no compression, tickets as configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN))
    _apply_session_settings(context, settings)
    return context


def _apply_session_settings(context: ssl.SSLContext, settings: TlsSettings) -> None:
    """Tickets and the client-certificate requirement: what a handshake takes from the front context."""
    if settings.session_tickets:
        context.options &= ~ssl.OP_NO_TICKET
        context.num_tickets = 2  # OpenSSL's default for TLS 1.3
    else:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    context.verify_mode = ssl.CERT_NONE if settings.client_ca is None else ssl.CERT_REQUIRED


class TlsTerminator:
    """The TLS listener's state: its front context, the certificates in effect, expiry warnings."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self.context = server_context(certificates.settings)
        self.context.sni_callback = self._select
        self._warned: dict[Path, float] = {}  # file -> when its expiry was last warned about
        self._subjects: dict[bytes, bytes] = {}
        self.handshakes = 0  # completed (a connection made), of which `resumed` with a session ticket
        self.resumed = 0

    @property
    def settings(self) -> TlsSettings:
        return self.certificates.settings

    def apply(self, certificates: Certificates) -> list[tuple[str, str | None, str | None]]:
        """Swap in a reloaded set (already checked whole): new handshakes use it, open connections
        keep what they have. Returns what changed, for the reload's answer."""
        changes = certificates.changes(self.certificates)
        self.certificates = certificates
        _apply_session_settings(self.context, certificates.settings)
        self._subjects.clear()
        self.warn_expiring()
        return changes

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _front: ssl.SSLContext) -> None:
        """The SNI callback, for every ClientHello: the certificate for the name asked for."""
        ssl_object.context = self.certificates.context_for(server_name)

    def connection_lines(self, transport: asyncio.BaseTransport) -> bytes:
        """The lines a TLS connection's requests carry to servers: X-Forwarded-Proto, and with mutual
        TLS the client certificate's subject (verified by the handshake) in the configured header."""
        ssl_object = transport.get_extra_info("ssl_object")
        self.handshakes += 1
        if ssl_object is not None and ssl_object.session_reused:
            self.resumed += 1
        settings = self.certificates.settings
        if settings.client_ca is None:
            return HTTPS_LINE
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        if not der:
            return HTTPS_LINE
        subject = self._subjects.get(der)
        if subject is None:
            subject = subject_value(der)
            if len(self._subjects) >= SUBJECT_CACHE:
                self._subjects.clear()
            self._subjects[der] = subject
        return HTTPS_LINE + settings.client_subject_header.encode() + b": " + subject + b"\r\n"

    def to_json(self, now: float | None = None) -> dict[str, object]:
        when = time.time() if now is None else now
        settings = self.certificates.settings
        return {
            "certificates": [c.to_json(when) for c in self.certificates.certificates],
            "client_ca": None if settings.client_ca is None else str(settings.client_ca),
            "client_subject_header": None if settings.client_ca is None else settings.client_subject_header,
            "session_tickets": settings.session_tickets,
        }

    def expiring(self, now: float) -> Iterator[Certificate]:
        for certificate in self.certificates.certificates:
            if certificate.days_left(now) < EXPIRY_WARNING_DAYS:
                yield certificate

    def warn_expiring(self, now: float | None = None) -> int:
        """A warning for each certificate that expires within 14 days (or has expired), once a day
        per certificate at most; returns how many were logged."""
        when = time.time() if now is None else now
        logged = 0
        for certificate in self.expiring(when):
            last = self._warned.get(certificate.file)
            if last is not None and when - last < DAY_S:
                continue
            self._warned[certificate.file] = when
            logged += 1
            days = certificate.days_left(when)
            if days <= 0:
                state = f"expired on {_iso(certificate.not_after)}"
            else:
                state = f"expires in {days:.1f} days ({_iso(certificate.not_after)})"
            log.warning(
                "tls: certificate %s (%s) %s; replace it and run lbctl reload",
                certificate.file, ", ".join(certificate.names), state,
            )  # fmt: skip
        return logged

    async def watch_expiry(self) -> None:
        """Checks the certificates' expiry every hour (warnings at most daily per certificate)."""
        while True:
            self.warn_expiring()
            await asyncio.sleep(EXPIRY_CHECK_PERIOD_S)


def subject_value(der: bytes) -> bytes:
    """A certificate's subject as an RFC 4514 string, as a header value: bytes outside printable
    ASCII are written as RFC 4514 hex escapes (\\XX), so no control character reaches a header."""
    text = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte < 0x7F:
            out.append(byte)
        else:
            out += b"\\%02X" % byte
    return bytes(out)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
