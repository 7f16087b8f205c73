"""What stands between the network and the labeling app's events: sign-in, sessions, one-time secrets and a
request filter, wired into Gradio by `GuardedBlocks.launch`.

  sign_in       Gradio's `auth=` callable, async: the credential check (scrypt) runs on worker threads, never
                on the event loop that serves every user; failed sign-ins are throttled per name and per client
                address (a growing lockout) and answered after a fixed delay, so a flood cannot hog the server
  Sessions      Gradio's token -> user table: a sign-in expires after `max_age_s`, and a deactivated account loses
                every session at its next request (Gradio looks the user up here for each request and event)
  Secrets       a new credential is handed to the admin who created it by a request of their own (GET
                /rlhf/secret/TICKET, once), never on an event stream another signed-in user might read
  Guard         ASGI middleware: no uploads (the app has none), a bound on request bodies, an event stream (its
                session_hash) bound to the user who opened it, the client address for the throttle; and the admin's
                downloads, answered to an admin's own request (rlhf.labeling checks the role): GET /rlhf/export.zip
                (the export as a zip) and /rlhf/report/RUN/ROUND (a loop round's report, sandboxed: it runs no
                script and reaches nothing)
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gradio as gr

CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="")
MAX_BODY_BYTES = 1 << 20
FAILED_SIGN_IN_DELAY_S = 0.5
SIGN_IN_WORKERS = 2
SECRET_PATH = "/rlhf/secret/"
SECRET_TTL_S = 600.0
EXPORT_PATH = "/rlhf/export.zip"
REPORT_PATH = "/rlhf/report/"
# A report is our own HTML, but it quotes model outputs: served as a sandbox (no script, no same-origin rights,
# nothing fetched), so even a mistake in its escaping could not act as the admin.
REPORT_POLICY = b"sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_KEYS = 100_000  # entries kept per table (throttle, session owners), so random names cannot exhaust memory


class Throttle:
    """Failed sign-ins per key (a name or a client address): after `max_failures` within `window_s`, the key waits
    `base_delay_s`, doubling with every further failure up to `max_delay_s`. A success clears the key."""

    def __init__(self, max_failures: int = 5, window_s: float = 900.0, base_delay_s: float = 30.0,
                 max_delay_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window_s = max_failures, window_s
        self.base_delay_s, self.max_delay_s, self.clock = base_delay_s, max_delay_s, clock
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Seconds before `key` may try again (0: now)."""
        with self.lock:
            now = self.clock()
            times = [t for t in self.failures.get(key, []) if now - t < self.window_s]
            if len(times) < self.max_failures:
                return 0.0
            delay = min(self.base_delay_s * 2 ** (len(times) - self.max_failures), self.max_delay_s)
            return max(0.0, times[-1] + delay - now)

    def failed(self, key: str) -> None:
        with self.lock:
            now = self.clock()
            if len(self.failures) >= MAX_KEYS:
                self.failures.pop(next(iter(self.failures)))
            times = [t for t in self.failures.pop(key, []) if now - t < self.window_s]
            self.failures[key] = (times + [now])[-4 * self.max_failures:]

    def clear(self, key: str) -> None:
        with self.lock:
            self.failures.pop(key, None)


def make_sign_in(check: Callable[[str, str], bool], names: Throttle, clients: Throttle,
                 fail_delay_s: float = FAILED_SIGN_IN_DELAY_S):
    """Gradio's `auth=` as a coroutine function (Gradio awaits only those; anything else it calls on its event
    loop). Two worker threads run `check` (scrypt releases the GIL): a burst of people signing in at a round's
    start is not served one by one, and a flood cannot take more threads than that. A throttled name or address
    is refused without running `check` at all."""
    worker = ThreadPoolExecutor(max_workers=SIGN_IN_WORKERS, thread_name_prefix="sign-in")

    async def sign_in(username: str, password: str) -> bool:
        keys = (names, f"name:{username.casefold()[:256]}"), (clients, f"client:{CLIENT.get()}")
        ok = False
        if all(throttle.wait_s(key) == 0 for throttle, key in keys):
            ok = bool(await asyncio.get_running_loop().run_in_executor(worker, check, username, password))
        if ok:
            names.clear(keys[0][1])
            return True
        for throttle, key in keys:
            throttle.failed(key)
        await asyncio.sleep(fail_delay_s)  # the same answer time for every refusal; holds no thread
        return False

    return sign_in


class Sessions(dict):
    """Gradio's token -> user name table (it reads it with `.get` on every request), with an expiry and the
    account's `active` flag checked at each read: a deactivated user is signed out at their next request."""

    def __init__(self, is_active: Callable[[str], bool], max_age_s: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.is_active, self.max_age_s, self.clock = is_active, max_age_s, clock
        self.issued: dict[str, float] = {}

    def __setitem__(self, token, user) -> None:
        super().__setitem__(token, user)
        self.issued[token] = self.clock()

    def __delitem__(self, token) -> None:
        super().__delitem__(token)
        self.issued.pop(token, None)

    def get(self, token, default=None):
        user = super().get(token)
        if user is None:
            return default
        if self.clock() - self.issued.get(token, 0.0) > self.max_age_s or not self.is_active(user):
            self.pop(token, None)
            self.issued.pop(token, None)
            return default
        return user


class Secrets:
    """One-time secrets for one user: `put` returns a ticket (safe to show anywhere), `take` gives the secret once,
    to its owner only, within `SECRET_TTL_S`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.items: dict[str, tuple[str, str, float]] = {}
        self.clock = clock
        self.lock = threading.Lock()

    def put(self, owner: str, secret: str) -> str:
        ticket = secrets.token_urlsafe(24)
        with self.lock:
            now = self.clock()
            self.items = {t: v for t, v in self.items.items() if now - v[2] < SECRET_TTL_S}
            self.items[ticket] = (owner, secret, now)
        return ticket

    def take(self, ticket: str, user: str | None) -> str | None:
        with self.lock:
            owner, secret, at = self.items.get(ticket, (None, None, 0.0))
            if owner is None or user != owner or self.clock() - at > SECRET_TTL_S:
                return None
            del self.items[ticket]
            return secret


async def _answer(send, status: int, body: str | bytes, content_type: str = "application/json",
                  headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": body if isinstance(body, bytes) else body.encode()})


class Guard:
    """ASGI middleware around Gradio's app. `blocks` gives the running server app (its token table and cookie
    name); `secrets` answers SECRET_PATH."""

    def __init__(self, app, blocks: gr.Blocks, secrets: Secrets, max_body: int = MAX_BODY_BYTES):
        self.app, self.blocks, self.secrets, self.max_body = app, blocks, secrets, max_body
        self.owners: dict[str, str] = {}

    def user(self, scope) -> str | None:
        from starlette.requests import HTTPConnection

        server = self.blocks.server_app
        cookies = HTTPConnection(scope).cookies
        token = cookies.get(f"access-token-{server.cookie_id}") or cookies.get(
            f"access-token-unsecure-{server.cookie_id}")
        return server.tokens.get(token) if token else None

    def owns(self, session_hash: str | None, user: str | None) -> bool:
        """Binds a session_hash to the first signed-in user who uses it; False for anyone else."""
        if not session_hash or user is None:
            return True  # Gradio itself refuses a request without a sign-in
        if len(self.owners) >= MAX_KEYS and session_hash not in self.owners:
            self.owners.pop(next(iter(self.owners)))
        return self.owners.setdefault(session_hash, user) == user

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        CLIENT.set((scope.get("client") or ("", 0))[0])
        path = scope["path"]
        if path.rstrip("/").endswith("/upload") or path.rstrip("/").endswith("/upload_progress"):
            return await _answer(send, 403, '{"detail": "This app takes no uploads."}')
        if path.startswith(SECRET_PATH):
            secret = self.secrets.take(path[len(SECRET_PATH):], self.user(scope))
            if secret is None:
                return await _answer(send, 404, "Not found (a secret is shown once, to whoever created it).",
                                     "text/plain")
            return await _answer(send, 200, secret, "text/plain")
        if scope["method"] == "GET" and (path == EXPORT_PATH or path.startswith(REPORT_PATH)):
            return await self._download(scope, send, path)
        if path.endswith("/queue/data") or "/heartbeat/" in path:
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            session = (query.get("session_hash") or [path.rsplit("/heartbeat/", 1)[-1]])[0]
            if not self.owns(session, self.user(scope)):
                return await _answer(send, 403, '{"detail": "Not your session."}')
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        return await self._with_body(scope, receive, send)

    async def _download(self, scope, send, path: str):
        """The export zip or a round's report, for an admin (the role checked by rlhf.labeling, off the event loop);
        404 for anyone else and for what is not there."""
        from rlhf import labeling
        from rlhf.store import StoreError

        user, store = self.user(scope), self.blocks.store

        def fetch():
            if path == EXPORT_PATH:
                return labeling.export_zip(store, user)
            run_id, _, round_ = path[len(REPORT_PATH):].partition("/")
            report = labeling.round_report(store, user, run_id, int(round_)) if round_.isdigit() else None
            return report.read_bytes() if report is not None else None

        try:
            body = await asyncio.to_thread(fetch) if user is not None else None
        except (PermissionError, StoreError, OSError):  # not an admin (or no longer an account); a report gone
            body = None
        if body is None:
            return await _answer(send, 404, "Not found (admins only).", "text/plain")
        if path == EXPORT_PATH:
            name = f"rlhf-export-{time.strftime('%Y%m%d-%H%M%S')}.zip"
            return await _answer(send, 200, body, "application/zip",
                                 ((b"content-disposition", f'attachment; filename="{name}"'.encode()),))
        return await _answer(send, 200, body, "text/html; charset=utf-8",
                             ((b"content-security-policy", REPORT_POLICY), (b"x-content-type-options", b"nosniff")))

    async def _with_body(self, scope, receive, send):
        """Reads the whole body first (refusing one over `max_body`), checks a queue/join's session, replays it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _answer(send, 413, json.dumps({"detail": f"Request over {self.max_body} bytes."}))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if scope["path"].endswith("/queue/join"):
            try:
                session = json.loads(body).get("session_hash")
            except (ValueError, AttributeError):
                session = None
            if not self.owns(session if isinstance(session, str) else None, self.user(scope)):
                return await _answer(send, 403, '{"detail": "Not your session."}')
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class GuardedBlocks(gr.Blocks):
    """The app's Blocks: `launch` always signs in through `make_sign_in` (around the `auth=` it is given, else the
    store's check), installs `Sessions` and puts `Guard` in front, whoever calls it (the CLI, a test)."""

    def __init__(self, store, session_hours: float, **kwargs):
        super().__init__(**kwargs)
        self.store, self.session_hours = store, session_hours
        self.secrets = Secrets()
        # An address may be shared (a NAT, a proxy): it gets more tries than one name before its lockout.
        self.name_throttle, self.client_throttle = Throttle(max_failures=5), Throttle(max_failures=20)

    def launch(self, *args, auth=None, prevent_thread_lock: bool = False, app_kwargs: dict | None = None, **kwargs):
        from starlette.middleware import Middleware

        check = auth if callable(auth) else (lambda name, credential: self.store.authenticate(name, credential)
                                             is not None)
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(Guard, blocks=self,
                                                                                  secrets=self.secrets)]
        result = super().launch(*args, auth=make_sign_in(check, self.name_throttle, self.client_throttle),
                                prevent_thread_lock=True, app_kwargs=app_kwargs, **kwargs)
        sessions = Sessions(self.is_active, self.session_hours * 3600)
        sessions.update(self.server_app.tokens)
        self.server_app.tokens = sessions
        if not prevent_thread_lock:
            self.block_thread()
        return result

    def is_active(self, user: str) -> bool:
        from rlhf.store import StoreError

        try:
            row = self.store.annotator(user)
        except StoreError:
            return False
        return bool(row.active) and not row.simulated
