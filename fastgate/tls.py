"""TLS termination with the operator's certificate: TLS 1.2 or newer, ALPN http/1.1, no compression."""

from __future__ import annotations

import os
import ssl

from .errors import ConfigError


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    # fastgate speaks HTTP/1.1 only; saying so lets clients that offer h2 fall back cleanly.
    context.set_alpn_protocols(["http/1.1"])
    for key, path in (("server.tls_cert", cert_file), ("server.tls_key", key_file)):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: cannot read {path}")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"server.tls_cert: cannot load certificate and key ({exc})") from None
    return context
