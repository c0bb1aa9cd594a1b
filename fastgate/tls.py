"""TLS termination with the operator's certificate: TLS 1.2 or newer, ALPN http/1.1, no compression."""

from __future__ import annotations

import os
import ssl

from .errors import ConfigError


class _PassphraseRefused(Exception):
    """Raised by the passphrase callback: fastgate never asks anyone for a key's passphrase."""


def _refuse_passphrase() -> str:
    # Without a callback OpenSSL asks for the passphrase on the controlling terminal and waits for an answer:
    # at startup under a terminal that looks like a hang, and on SIGHUP it froze the whole event loop (every
    # connection) until someone typed. Raising here makes loading an encrypted key fail at once instead.
    raise _PassphraseRefused


def load_certificate(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load the certificate chain and key into `context`, never prompting; ConfigError names what is wrong."""
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except _PassphraseRefused:
        raise ConfigError(f"server.tls_key: {key_file} is encrypted (passphrase-protected) and fastgate does not "
                          f"prompt for passphrases; give it an unencrypted key readable only by fastgate's user "
                          f"(openssl pkey -in {key_file} -out NEW.key, then chmod 600 NEW.key)") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"server.tls_cert: cannot load certificate and key ({exc})") from None


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    # fastgate speaks HTTP/1.1 only; saying so lets clients that offer h2 fall back cleanly.
    context.set_alpn_protocols(["http/1.1"])
    for key, path in (("server.tls_cert", cert_file), ("server.tls_key", key_file)):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: cannot read {path}")
    load_certificate(context, cert_file, key_file)
    return context
