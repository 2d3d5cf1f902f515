"""An origin's TLS session, kept to resume new connections, set without the stdlib's DER round trip.

CPython's ``ssl`` copies a session through its DER form whenever one is set on a connection
(``wrap_bio(session=...)``): a workaround for an OpenSSL 1.1.0 bug that also clears the
session's "not resumable" mark, which OpenSSL puts on a client session whose connection is
freed without a TLS shutdown. Decoding that DER decodes the server's certificate again, and
on OpenSSL 3.0 that builds a key decoder each time: about 190 µs, 40% of a resumed handshake
of Parkway's, for a copy the current OpenSSL does not need (``loadtest.tlsmicro``).

Here the same thing is done with OpenSSL's own in-memory copy, ``SSL_SESSION_dup`` (OpenSSL
1.1.1+), through :mod:`ctypes` on the ``libssl`` that :mod:`ssl` already loaded: the session is
copied once when it is kept (so no connection's end can mark it) and once per connection it is
set on (so nothing a connection does to its session reaches the kept one), as the stdlib does.
Nothing else changes: the connection is made by the same ``SSLContext`` with the same
certificate and host-name checks, and the session is still kept per origin.

The ``ssl`` module's objects do not expose their OpenSSL pointers, so they are read at fixed
offsets of CPython's ``_ssl`` structures. That layout is checked against what it must hold
(each object's context field is the context the caller has) before anything is dereferenced,
and when it does not hold, or ``ctypes``/``libssl`` are not there, :func:`keep` gives a
:class:`KeptSession` that resumes through the stdlib (``fast`` False), as before.
``PARKWAY_TLS_SESSIONS=stdlib`` in the environment chooses that path outright.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["KeptSession", "keep", "wrap"]

_VOID = ctypes.c_void_p
_HEAD = object.__basicsize__  # PyObject_HEAD (larger on a Py_TRACE_REFS build)
_WORD = ctypes.sizeof(_VOID)


class _LibSSL:
    """The few ``libssl`` functions used, bound once; ``None`` where they cannot be."""

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # its symbols resolve in the libssl it links (a dlsym of its deps)
        self.dup = _bind(lib.SSL_SESSION_dup, _VOID, _VOID)
        self.free = _bind(lib.SSL_SESSION_free, None, _VOID)
        self.set = _bind(lib.SSL_set_session, ctypes.c_int, _VOID, _VOID)
        self.get0 = _bind(lib.SSL_get_session, _VOID, _VOID)
        self.resumable = _bind(lib.SSL_SESSION_is_resumable, ctypes.c_int, _VOID)
        self.has_ticket = _bind(lib.SSL_SESSION_has_ticket, ctypes.c_int, _VOID)
        self.ssl_ctx = _bind(lib.SSL_get_SSL_CTX, _VOID, _VOID)


def _bind(fn: Any, restype: Any, *argtypes: Any) -> Any:
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _load(environ: Mapping[str, str] = os.environ) -> _LibSSL | None:
    if environ.get("PARKWAY_TLS_SESSIONS") == "stdlib":
        return None  # the operator's choice: every session through the ssl module, as before
    if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return None  # layouts read below are CPython's, checked for these versions
    if ssl._ssl._SSLSocket.__basicsize__ < _HEAD + 3 * _WORD:  # type: ignore[attr-defined]
        return None
    try:
        return _LibSSL()
    except (AttributeError, OSError):  # no ctypes libssl (a static _ssl), or an OpenSSL before 1.1.1
        return None


_LIB = _load()


def _word(address: int) -> int:
    return _VOID.from_address(address).value or 0


def _ssl_of(tls: ssl.SSLObject, context: ssl.SSLContext) -> int:
    """The ``SSL *`` of ``tls`` (made by ``context``), or 0 when the layout is not what is expected:
    CPython's ``PySSLSocket`` is ``{HEAD; Socket; SSL *ssl; PySSLContext *ctx; ...}`` and
    ``PySSLContext`` is ``{HEAD; SSL_CTX *ctx; ...}``."""
    obj = tls._sslobj  # type: ignore[attr-defined]
    if _word(id(obj) + _HEAD + 2 * _WORD) != id(context):
        return 0
    pointer = _word(id(obj) + _HEAD + _WORD)
    if not pointer or _LIB is None or _LIB.ssl_ctx(pointer) != _word(id(context) + _HEAD):
        return 0
    return pointer


class KeptSession:
    """One origin's TLS session: on the fast path a private copy of its ``SSL_SESSION`` (freed
    with this object) that new connections resume from, else the stdlib's session object."""

    __slots__ = ("_copy", "context", "session")

    def __init__(self, session: ssl.SSLSession | None, context: ssl.SSLContext, copy: int = 0):
        self.session = session
        self.context = context
        self._copy = copy

    @property
    def fast(self) -> bool:
        """Whether connections resume it without the stdlib's DER copy."""
        return self._copy != 0

    def __del__(self) -> None:
        if self._copy and _LIB is not None:
            _LIB.free(self._copy)
            self._copy = 0


def keep(tls: ssl.SSLObject) -> KeptSession | None:
    """The session of ``tls`` (a client connection) to resume others with, or
    None while it has none that can be resumed: TLS 1.3 resumes only with a ticket, which the
    server sends after the handshake (it has come by the time the response head has)."""
    tls13 = tls.version() == "TLSv1.3"
    context = tls.context
    pointer = _ssl_of(tls, context) if _LIB is not None else 0
    if pointer:
        assert _LIB is not None
        # Copied (no connection holds the copy, so none can mark it "not resumable" when it ends),
        # without the stdlib's getter: it costs a DER round trip too (~170 µs).
        live = _LIB.get0(pointer)
        copy = _LIB.dup(live) if live else 0
        if not copy:
            return None
        if _LIB.resumable(copy) and (_LIB.has_ticket(copy) or not tls13):
            return KeptSession(None, context, copy)
        _LIB.free(copy)
        return None
    session = tls.session
    if session is None or not (session.has_ticket or (session.id and not tls13)):
        return None
    return KeptSession(session, context)


def wrap(
    context: ssl.SSLContext, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_hostname: str,
    kept: KeptSession | None,
) -> ssl.SSLObject:  # fmt: skip
    """``context.wrap_bio`` for a client connection that resumes ``kept`` when given (kept under
    this same context: another context's session is not offered)."""
    if kept is None or kept.context is not context:
        return context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    if kept.fast:
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        assert _LIB is not None
        pointer = _ssl_of(tls, context)
        if pointer:
            copy = _LIB.dup(kept._copy)  # this connection's own: what it does to it stays there
            if copy:
                _LIB.set(pointer, copy)  # takes its own reference
                _LIB.free(copy)
            return tls
    return context.wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=kept.session)
