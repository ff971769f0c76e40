"""Who may use the page, and how much: access token and sessions, CSRF, Host names, rate limits.

A lab network is not a safe place, so the page trusts no request by default:
- Loopback without a token ("open"): only someone on the Pi itself can connect; the Host header must
  be a loopback name, so that a web page elsewhere cannot reach it through DNS rebinding.
- Anything else ("token"): every request carries a session cookie (HttpOnly, SameSite=Strict, Secure
  under TLS) given for the token at /login, or ``Authorization: Bearer <token>``.
- Every POST must come from the page itself: its Origin (or Referer) must be this server, and it must
  carry the CSRF token embedded in the page (a header a cross-site form cannot set).
- Requests per client address are rate limited (token bucket), and login attempts more strictly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from urllib.parse import urlsplit

from edge.config import LOOPBACK_HOSTS

SESSION_COOKIE = "leukoscope_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 64
LOGIN_ATTEMPTS_PER_MIN = 5


class RateLimiter:
    """A token bucket per client address: ``rate`` requests per second sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, max_clients: int = 1024) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def ready(self, client: str) -> bool:
        """Whether one request would be allowed now (nothing is used up)."""
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), time.monotonic()))
            return tokens + (time.monotonic() - last) * self.rate >= 1.0

    def allow(self, client: str, cost: float = 1.0) -> float:
        """0 when allowed, else the seconds until it would be (for Retry-After)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < cost:
                self._buckets[client] = (tokens, now)
                return (cost - tokens) / self.rate
            if len(self._buckets) >= self.max_clients and client not in self._buckets:
                self._buckets.pop(next(iter(self._buckets)))  # forget the oldest client, not the limit
            self._buckets[client] = (tokens - cost, now)
            return 0.0


class Guard:
    """The page's access rules in one place (see the module docstring)."""

    def __init__(self, *, token: str | None, host: str, port_is_tls: bool, allowed_hosts: list[str],
                 rate_per_s: float, rate_burst: int) -> None:
        self.token = token
        self.mode = "token" if token else "open"
        if self.mode == "open" and host not in LOOPBACK_HOSTS:
            raise ValueError("an open page must listen on loopback")  # also refused by the config schema
        self.tls = port_is_tls
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_HOSTS, "[::1]", *allowed_hosts)}
        self.secret = secrets.token_bytes(32)  # per process: a restart logs everyone out, which is fine
        self.sessions: dict[str, float] = {}
        self.limiter = RateLimiter(rate_per_s, rate_burst)
        self.login_limiter = RateLimiter(LOGIN_ATTEMPTS_PER_MIN / 60.0, LOGIN_ATTEMPTS_PER_MIN)
        self._lock = threading.Lock()

    # -- Host -------------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """Open mode answers only to loopback names (and allowed_hosts): a DNS-rebinding page is refused.
        With a token the token protects, and the Pi's address is not known in advance."""
        if self.mode == "token":
            return True
        if not host_header:
            return False
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[:name.find("]") + 1]
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        return name in self.allowed_hosts

    # -- authentication ----------------------------------------------------------------------
    def check_token(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def new_session(self) -> str:
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self.sessions = {s: t for s, t in self.sessions.items() if t > now}
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[session] = now + SESSION_TTL_S
        return session

    def end_session(self, session: str | None) -> None:
        with self._lock:
            self.sessions.pop(session or "", None)

    def session_of(self, cookie_header: str | None) -> str | None:
        """The valid session named by the request's cookie, if any."""
        for part in (cookie_header or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE:
                with self._lock:
                    expires = self.sessions.get(value)
                if expires and expires > time.monotonic():
                    return value
        return None

    def authenticated(self, cookie_header: str | None, authorization: str | None) -> str | None:
        """How the request is allowed in ("loopback", "session", "bearer"), or None."""
        if self.mode == "open":
            return "loopback"
        if self.session_of(cookie_header):
            return "session"
        if authorization and authorization.startswith("Bearer ") and self.check_token(authorization[7:].strip()):
            return "bearer"
        return None

    def cookie(self, session: str) -> str:
        secure = "; Secure" if self.tls else ""
        return f"{SESSION_COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL_S}{secure}"

    # -- cross-site requests ---------------------------------------------------------------------
    def csrf_token(self, session: str | None) -> str:
        """Bound to the session (or to "open"/"login"): a token from one session is useless in another."""
        return hmac.new(self.secret, (session or self.mode).encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, *, session: str | None, offered: str | None, origin: str | None, referer: str | None,
                host: str | None) -> str | None:
        """None when the POST is the page's own, else why not (one line)."""
        own = f"{'https' if self.tls else 'http'}://{(host or '').lower()}"
        if origin is not None and origin != "null":
            if origin.lower() != own:
                return f"cross-site request refused (Origin {origin[:100]} is not {own})"
        elif referer:
            parts = urlsplit(referer)
            if f"{parts.scheme}://{parts.netloc}".lower() != own:
                return "cross-site request refused (Referer is another site)"
        elif origin == "null":
            return "cross-site request refused (Origin null)"
        if not offered or not hmac.compare_digest(offered.encode(), self.csrf_token(session).encode()):
            return "missing or wrong CSRF token; reload the page"
        return None
