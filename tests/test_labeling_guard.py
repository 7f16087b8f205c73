"""The labeling app against a hostile annotator: sign-in, sessions, secrets, uploads, body sizes, streams, and the
launch's one-line errors. Unit tests of labeling_ui.guard first, then the running app over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from labeling_ui import guard
from labeling_ui.app import LabelConfig, build_app, check_launch, launch, masked_url
from labeling_ui.guard import Secrets, Sessions, Throttle, make_sign_in
from rlhf.config import UserError
from rlhf.store import Store


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_locks_a_key_after_repeated_failures_and_doubles_the_wait():
    clock = Clock()
    throttle = Throttle(max_failures=3, window_s=60, base_delay_s=10, max_delay_s=25, clock=clock)
    for _ in range(3):
        assert throttle.wait_s("k") == 0
        throttle.failed("k")
    assert throttle.wait_s("k") == 10 and throttle.wait_s("other") == 0
    throttle.failed("k")
    assert throttle.wait_s("k") == 20
    throttle.failed("k")
    assert throttle.wait_s("k") == 25  # capped
    clock.now += 61
    assert throttle.wait_s("k") == 0  # old failures leave the window
    throttle.failed("k")
    throttle.clear("k")
    assert throttle.wait_s("k") == 0


def _run(coroutine, client: str = ""):
    """asyncio.run in a thread of its own (a browser test's Playwright may hold this thread's loop), as `client`."""
    result = []

    def main():
        guard.CLIENT.set(client)
        result.append(asyncio.run(coroutine))

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    return result[0]


def _sign_in(check, **throttle):
    names, clients = Throttle(**throttle), Throttle(**throttle)
    return make_sign_in(check, names, clients, fail_delay_s=0.0), names, clients


def test_sign_in_runs_the_check_off_the_event_loop_and_other_work_goes_on():
    threads = []

    def slow_check(name: str, credential: str) -> bool:
        threads.append(threading.current_thread())
        time.sleep(0.8)  # a slow hash
        return credential == "right"

    sign_in, _, _ = _sign_in(slow_check)
    loop_thread = []

    async def main():
        ticks, done = [time.monotonic()], asyncio.Event()
        loop_thread.append(threading.current_thread())

        async def ticker():
            while not done.is_set():
                await asyncio.sleep(0.02)
                ticks.append(time.monotonic())

        running = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        results = await asyncio.gather(sign_in("a", "wrong"), sign_in("b", "right"))
        done.set()
        await running
        return results, ticks

    (wrong, right), ticks = _run(main())
    assert (wrong, right) == (False, True)
    assert len(threads) == 2 and loop_thread[0] not in threads
    # The loop kept ticking while the checks ran: a check on the loop would leave a gap of 0.8 s.
    assert ticks[-1] - ticks[0] >= 0.8 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.4


def test_wrong_credentials_lock_the_name_and_the_client_address():
    calls = []

    def check(name: str, credential: str) -> bool:
        calls.append(name)
        return credential == "right"

    sign_in, names, clients = _sign_in(check, max_failures=5)
    for _ in range(30):
        assert not _run(sign_in("alice", "wrong"), "10.0.0.1")
    # 30 wrong credentials, then the right one: still refused, and the check was not even run past the 5th.
    assert not _run(sign_in("alice", "right"), "10.0.0.1") and len(calls) == 5
    assert not _run(sign_in("alice", "right"), "10.0.0.2")  # the name is locked from any address
    assert _run(sign_in("bob", "right"), "10.0.0.2")  # another name from another address signs in
    # One address trying many names is locked too.
    for i in range(5):
        assert not _run(sign_in(f"name{i}", "wrong"), "10.0.0.3")
    assert not _run(sign_in("carol", "right"), "10.0.0.3") and "carol" not in calls


def test_unknown_names_cost_one_scrypt_as_known_ones_do(tmp_path, monkeypatch):
    from rlhf.store import accounts

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    credential = store.add_annotator("alice")
    store.add_annotator("gone")
    store.set_active("gone", False)
    store.annotator("sim", create_simulated=True)
    checked = []
    real = accounts._check_credential
    monkeypatch.setattr(accounts, "_check_credential", lambda c, h: checked.append(h) or real(c, h))
    assert store.authenticate("alice", credential) is not None
    for name in ("alice", "nobody", "gone", "sim"):
        assert store.authenticate(name, "wrong") is None
    assert store.authenticate("gone", "x") is None
    assert len(checked) == 6 and all(h.startswith("scrypt$") for h in checked)


def test_sessions_expire_and_end_when_the_account_is_deactivated():
    clock, active = Clock(), {"ann": True}
    sessions = Sessions(lambda user: active.get(user, False), max_age_s=3600, clock=clock)
    sessions["t1"] = "ann"
    assert sessions.get("t1") == "ann" and sessions.get("nope") is None and sessions.get(None) is None
    active["ann"] = False
    assert sessions.get("t1") is None and "t1" not in sessions  # signed out at once
    active["ann"] = True
    sessions["t2"] = "ann"
    clock.now += 3601
    assert sessions.get("t2") is None


def test_a_secret_is_given_once_and_only_to_its_owner():
    clock = Clock()
    box = Secrets(clock=clock)
    ticket = box.put("boss", "s3cret")
    assert box.take(ticket, "mallory") is None and box.take(ticket, None) is None
    assert box.take(ticket, "boss") == "s3cret" and box.take(ticket, "boss") is None
    late = box.put("boss", "other")
    clock.now += guard.SECRET_TTL_S + 1
    assert box.take(late, "boss") is None


# ---------------------------------------------------------------- the running app over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'app.db'}")
    [pid] = store.add_prompts(["Review a film."])
    store.add_task(store.add_responses(pid, ["Good.", "Bad."], model="m"), overlap=2)
    credentials = {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", role="admin"),
                   "eve": store.add_annotator("eve")}
    port = _free_port()
    app = build_app(LabelConfig(db=store.url, port=port, repeat_share=0.0), store)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, footer_links=[])
    yield f"http://127.0.0.1:{port}", credentials, app, store
    app.close()


@contextlib.contextmanager
def _client(url: str, user: str, credential: str):
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/login", data={"username": user, "password": credential})
        yield client


def _event(client: httpx.Client, fn_index: int, data: list, session: str | None = None):
    """Join the queue for one event and read its stream to the end: (output or refusal code, every data line)."""
    session = session or uuid.uuid4().hex
    joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                         "event_data": None, "trigger_id": None})
    if joined.status_code != 200:
        return {"refused": joined.status_code}, []
    lines = []
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message["output"], lines
    return None, lines


def test_a_deactivated_admin_loses_the_admin_page_at_once(served, tmp_path):
    url, credentials, app, store = served
    by_name = {fn.name: index for index, fn in app.fns.items()}
    with _client(url, "boss", credentials["boss"]) as boss:
        assert _event(boss, by_name["on_overview"], [])[0]["data"][0].startswith("**Pairs")
        store.set_active("boss", False)
        target = tmp_path / "after"
        assert _event(boss, by_name["on_export"], [str(target)])[0] == {"refused": 401}
        assert not target.exists() and boss.get("/gradio_api/user").json() is None
        store.set_active("boss", True)
        assert _event(boss, by_name["on_overview"], [])[0] == {"refused": 401}  # that sign-in is over for good


def test_a_sign_in_expires(served):
    url, credentials, app, _ = served
    with _client(url, "ann", credentials["ann"]) as ann:
        assert ann.get("/gradio_api/user").json() == "ann"
        app.server_app.tokens.max_age_s = 0.0
        assert ann.get("/gradio_api/user").json() is None


def test_the_new_credential_never_travels_on_the_event_stream(served):
    url, credentials, app, store = served
    by_name = {fn.name: index for index, fn in app.fns.items()}
    with _client(url, "boss", credentials["boss"]) as boss, _client(url, "eve", credentials["eve"]) as eve:
        output, lines = _event(boss, by_name["on_add_annotator"], ["dora", False])
        [message] = output["data"]
        ticket_path = message[message.index("(/rlhf/secret/") + 1:message.rindex(")")]
        # Eve, reading the stream or holding the link, gets nothing; the admin gets it once.
        assert eve.get(ticket_path).status_code == 404
        got = boss.get(ticket_path)
        assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
        assert store.authenticate("dora", got.text) is not None
        assert all(got.text not in line for line in lines)
        assert boss.get(ticket_path).status_code == 404


def test_another_users_event_stream_is_refused(served):
    url, credentials, app, _ = served
    by_name = {fn.name: index for index, fn in app.fns.items()}
    with _client(url, "boss", credentials["boss"]) as boss, _client(url, "eve", credentials["eve"]) as eve:
        session = uuid.uuid4().hex
        assert _event(boss, by_name["on_overview"], [], session)[0]["data"][0].startswith("**Pairs")
        assert eve.get("/gradio_api/queue/data", params={"session_hash": session}).status_code == 403
        assert eve.get(f"/gradio_api/heartbeat/{session}").status_code == 403
        assert _event(eve, by_name["on_overview"], [], session)[0] == {"refused": 403}


def test_no_uploads_and_no_huge_requests(served):
    url, credentials, app, store = served
    by_name = {fn.name: index for index, fn in app.fns.items()}
    with _client(url, "ann", credentials["ann"]) as ann:
        refused = ann.post("/gradio_api/upload", files={"files": ("x.bin", b"0" * 1000)})
        assert refused.status_code == 403 and "no uploads" in refused.text
        big = "x" * (guard.MAX_BODY_BYTES + 10)
        assert ann.post("/gradio_api/queue/join", json={"data": [big], "fn_index": 0}).status_code == 413
        # A rationale over the app's limit, under the body limit: a message on the page, nothing stored.
        from gradio_client import Client

        client = Client(url, auth=("ann", credentials["ann"]), verbose=False)
        task = client.predict(api_name="/next_task")
        message = client.predict(task["task_id"], task["left_is_a"], "left", "clear", "y" * 5000, api_name="/vote")
        assert message.startswith("Not saved: the rationale has 5,000 characters") and store.votes() == []
        too_many = "\n".join(f"prompt {i}" for i in range(600))
    before = store.counts()
    with _client(url, "boss", credentials["boss"]) as boss:
        output, _ = _event(boss, by_name["on_add_prompts"], [too_many, "train"])
        assert output["data"][0].startswith("at most 500 prompts") and store.counts() == before


def test_launch_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="guidelines file .* not found"):
        check_launch(LabelConfig(guidelines=str(tmp_path / "missing.md")))
    with pytest.raises(UserError, match="cannot listen on --host 'no.such.host.invalid'"):
        check_launch(LabelConfig(host="no.such.host.invalid"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            check_launch(LabelConfig(port=port))
        from rlhf.cli import main

        assert main(["label", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use" in err


def test_the_database_password_is_never_printed(tmp_path, capsys, monkeypatch):
    assert masked_url("postgresql+psycopg2://rlhf:s3cret@127.0.0.1:5432/rlhf") == \
        "postgresql+psycopg2://rlhf:***@127.0.0.1:5432/rlhf"
    assert masked_url("sqlite:///x.db") == "sqlite:///x.db"
    # launch prints the store's URL and names it in its errors: both masked.
    import labeling_ui.app as app_module

    class FakeStore:
        url = "postgresql+psycopg2://rlhf:s3cret@127.0.0.1:5432/rlhf"

        def __init__(self, *_):
            pass

        def list_annotators(self):
            return []

    monkeypatch.setattr(app_module, "Store", FakeStore)
    with pytest.raises(UserError) as refused:
        launch(LabelConfig(port=_free_port()), block=False)
    assert "s3cret" not in str(refused.value) and "rlhf:***@" in str(refused.value)


def test_the_vote_endpoint_answers_bad_values_with_a_message(served):
    from gradio_client import Client

    url, credentials, _, store = served
    client = Client(url, auth=("ann", credentials["ann"]), verbose=False)
    task = client.predict(api_name="/next_task")
    before = store.counts()
    for args, starts in (((task["task_id"], "yes", "left", "clear", ""), "left_is_a must be"),
                         (("7", True, "left", "clear", ""), "No such task"),
                         ((task["task_id"], True, ["left"], "clear", ""), "Choose first"),
                         ((task["task_id"], True, "left", {"x": 1}, ""), "Choose how sure"),
                         ((task["task_id"], True, "left", "clear", 5), "The rationale must be text"),
                         ((10**6, True, "left", "clear", ""), "")):  # the store's refusal, as a message
        message = client.predict(*args, api_name="/vote")
        assert isinstance(message, str) and message.startswith(starts) and not message.startswith("Saved"), message
    assert store.counts() == before
