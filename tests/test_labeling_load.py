"""The labeling app under load: 20 annotators x 25 votes through the running app's API with gradio_client.

On SQLite and on PostgreSQL (CI starts it). Every vote goes through HTTP, Gradio's queue, the login, the handler
and the store, as a browser's would; the store must end up with exactly 500 votes, 25 per annotator, nobody twice on
a task and no task over its overlap.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter

import pytest

from labeling_ui.app import LabelConfig, build_app
from rlhf.store import Store

ANNOTATORS, VOTES_EACH, OVERLAP = 20, 25, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_twenty_annotators_twenty_five_votes_each_through_the_app(store_url):
    from gradio_client import Client

    store = Store(store_url)
    credentials = {f"ann{i:02d}": store.add_annotator(f"ann{i:02d}") for i in range(ANNOTATORS)}
    # 270 pairs x overlap 2 = 540 slots for 500 votes: the last tasks are contended, as in a real round's end.
    for i in range(270):
        [pid] = store.add_prompts([f"Review film number {i}."])
        store.add_task(store.add_responses(pid, [f"good {i}", f"bad {i}"], model="m"), overlap=OVERLAP)
    port = _free_port()
    app = build_app(LabelConfig(db=store_url, port=port, repeat_share=0.0), store)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, footer_links=[],
               auth=lambda u, p: store.authenticate(u, p) is not None)
    url = f"http://127.0.0.1:{port}/"
    errors, saved = [], Counter()

    def annotate(name: str) -> None:
        try:
            # 20 sign-ins at once each cost an scrypt: on a busy 2-core runner the last ones take longer than
            # httpx's default 5 s timeout.
            client = Client(url, auth=(name, credentials[name]), verbose=False, httpx_kwargs={"timeout": 60})
            while saved[name] < VOTES_EACH:
                task = client.predict(api_name="/next_task")
                if task["task_id"] is None:
                    errors.append(f"{name} ran out of tasks")
                    return
                message = client.predict(task["task_id"], task["left_is_a"], "left" if saved[name] % 2 else "right",
                                         "clear", "", api_name="/vote")
                if message.startswith("Saved"):
                    saved[name] += 1
                elif "got all its votes" not in message:  # a task filled meanwhile is normal; anything else is not
                    errors.append(f"{name}: {message}")
                    return
        except Exception as e:  # noqa: BLE001 - reported below with the annotator's name
            errors.append(f"{name}: {type(e).__name__}: {e}")

    try:
        threads = [threading.Thread(target=annotate, args=(name,)) for name in credentials]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        app.close()
    assert not errors, errors[:5]
    votes = store.votes()
    assert len(votes) == ANNOTATORS * VOTES_EACH == 500
    assert Counter(v["annotator"] for v in votes) == {name: VOTES_EACH for name in credentials}
    assert max(Counter((v["task_id"], v["annotator"]) for v in votes).values()) == 1
    assert max(Counter(v["task_id"] for v in votes).values()) <= OVERLAP
    # Each annotator chose "right" on votes 1, 3, ..., 25 and "left" on 2, ..., 24: the stored choice is the response
    # that was on the reported side, so exactly 12 of each annotator's votes name the response shown left.
    assert Counter(v["annotator"] for v in votes if v["choice"] == v["left"]) == {name: 12 for name in credentials}
