"""TLS for the MQTT connection: the client context, and what a failed handshake means in words.

A failed TLS handshake never reaches a CONNACK: paho only reports that the attempt
failed. The publisher keeps the `ssl` error and the TLS alerts paho logs and asks
`tls_failure_of` whether retrying can fix it; when not, it is treated like a refusal.
"""

from __future__ import annotations

import re
import ssl

from ganspect.edge.config import MqttConfig, TlsConfig
from ganspect.edge.errors import ConfigError

# OpenSSL's reason in a TLS error paho logs while reading, e.g. "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]".
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
# TLS failures that come from the network, not from the configuration: retrying may fix them.
_TRANSIENT_SSL = ("EOF", "SYSCALL", "ZERO_RETURN", "SHUTDOWN", "TIMEOUT")


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that verifies the broker (CA file or system CAs, host name) and holds the client certificate.

    The files are read here, at start-up: a missing, unreadable or malformed file is a
    ConfigError naming its key. Never prompts for a key pass phrase (a daemon has no
    terminal): an encrypted key is an error.
    """
    try:
        # PROTOCOL_TLS_CLIENT, CERT_REQUIRED, check_hostname and TLS 1.2 at least.
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"mqtt.tls.ca_file: cannot load CA certificates from {tls.ca_file}: {ssl_text(exc)} (expected PEM)"
        ) from exc
    if tls.cert_file is not None:
        asked_for_pass_phrase = []

        def no_pass_phrase() -> str:
            asked_for_pass_phrase.append(True)
            return ""

        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=no_pass_phrase)
        except (OSError, ssl.SSLError) as exc:
            if asked_for_pass_phrase:
                raise ConfigError(
                    f"mqtt.tls.key_file: {tls.key_file} is encrypted with a pass phrase, which a daemon "
                    "cannot type; store the key unencrypted (openssl pkey -in KEY -out NEW_KEY), "
                    "readable only by the daemon's user"
                ) from exc
            raise ConfigError(
                f"mqtt.tls.cert_file / mqtt.tls.key_file: cannot load the client certificate "
                f"{tls.cert_file} with the key {tls.key_file}: {ssl_text(exc)} (expected PEM files, "
                "the key matching the certificate)"
            ) from exc
    return context


def ssl_text(exc: BaseException) -> str:
    """An ssl/OS error as a short phrase: the verification message, OpenSSL's reason, or strerror."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def tls_failure_of(exc: BaseException | None, logged: str | None, config: MqttConfig) -> str | None:
    """What went wrong with TLS and what to check, when retrying cannot fix it; None for network trouble.

    `exc` is what connecting (TCP + handshake) raised; `logged` is paho's error line when the
    broker ended the session while paho was reading (under TLS 1.3 the broker's alert about
    a missing or rejected client certificate arrives after the client's side of the handshake).
    """
    tls = config.tls
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = f"mqtt.tls.ca_file ({tls.ca_file})" if tls.ca_file else "mqtt.tls.ca_file (unset: the system's CAs)"
        return (
            f"the broker's certificate did not verify ({ssl_text(exc)}); check {ca} is the CA that signed "
            f"the broker's certificate and that mqtt.host ({config.host}) is a name in that certificate"
        )
    reason: str | None = None
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.__class__.__name__.upper()
    elif logged and (match := _SSL_REASON.search(logged)):
        reason = match.group(1)
    if reason is None or any(word in reason for word in _TRANSIENT_SSL):
        return None
    words = reason.replace("_", " ").lower()
    if "CERTIFICATE_REQUIRED" in reason:
        return f"the broker requires a client certificate ({words}); " + (
            "set mqtt.tls.cert_file and mqtt.tls.key_file"
            if tls.cert_file is None
            else f"it did not accept {tls.cert_file} (mqtt.tls.cert_file)"
        )
    if "ALERT" in reason:
        return (
            f"the broker rejected the TLS session ({words}); check that the client certificate "
            f"{tls.cert_file} (mqtt.tls.cert_file) is signed by a CA the broker trusts and is still valid"
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
        return f"the broker does not speak TLS on port {config.port} ({words}); check mqtt.port and mqtt.tls.enabled"
    return f"TLS handshake failed ({words}); check the mqtt.tls settings against the broker's listener"
