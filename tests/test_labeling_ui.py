"""The labeling app: handlers without a browser, then the real page in Chromium."""

from __future__ import annotations

import random
import socket

import pytest

from labeling_ui.app import LabelConfig, admin_export, admin_overview, build_app, next_for, render_text, undo, vote
from rlhf.store import Store

XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> **bold**"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'app.db'}")
    for i in range(3):
        [pid] = s.add_prompts([f"Review film {i}."])
        ids = s.add_responses(pid, [f"Great film {i}! {XSS}", f"Dull film {i}. " + "long " * 30000], model="m")
        s.add_task(ids, overlap=2)
    return s


def test_render_text_escapes_html_and_cuts_huge_text():
    shown = render_text(XSS)
    assert "<script>" not in shown and "&lt;script&gt;" in shown and "<img" not in shown
    huge = render_text("x" * 100_000)
    assert len(huge) < 21_000 and "more characters not shown" in huge


def test_vote_maps_screen_sides_to_stored_choice(store):
    store.add_annotator("ann")
    rng = random.Random(0)
    seen = 0
    while (task := next_for(store, "ann", None, rng))["task_id"] is not None:
        message = vote(store, "ann", task, "left", "strong", " because ", "v1")
        assert message.startswith("Saved")
        seen += 1
    assert seen == 3
    for v in store.votes():
        # "left" was chosen every time: the stored choice is whichever response was on the left.
        assert v["choice"] == v["left"] and v["strength"] == 3 and v["rationale"] == "because"
        assert v["guideline_version"] == "v1" and v["seconds"] is not None


def test_vote_needs_a_choice_and_undo_returns_the_task(store):
    store.add_annotator("ann")
    task = next_for(store, "ann", None, random.Random(1))
    assert vote(store, "ann", task, "", "clear", "", "v1").startswith("Choose")
    assert vote(store, "ann", task, "tie", "clear", "", "v1").startswith("Saved")
    assert vote(store, "ann", task, "tie", "clear", "", "v1") == "You had already voted on that one."
    assert undo(store, "ann", 300).startswith("Your last vote was undone")
    assert store.votes() == []


def test_admin_handlers_refuse_annotators(store, tmp_path):
    store.add_annotator("ann")
    store.add_annotator("boss", role="admin")
    with pytest.raises(PermissionError):
        admin_overview(store, "ann")
    with pytest.raises(PermissionError):
        admin_export(store, "ann", str(tmp_path / "out"))
    assert "tasks complete" in admin_overview(store, "boss")
    assert admin_export(store, "boss", str(tmp_path / "out")).startswith("Exported")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(store):
    from labeling_ui.app import CSS, KEYS_JS

    credentials = {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", role="admin")}
    port = _free_port()
    app = build_app(LabelConfig(db=store.url, port=port), store)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, head=KEYS_JS,
               footer_links=[],
               auth=lambda u, p: store.authenticate(u, p) is not None)
    yield f"http://127.0.0.1:{port}", credentials
    app.close()


def _sign_in(page, url, user, credential):
    page.goto(url)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", credential)
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-btn", timeout=30_000)


@pytest.mark.browser
def test_annotator_votes_with_mouse_and_keyboard_in_chromium(running_app, browser, artifacts_dir, store):
    url, credentials = running_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, url, "ann", credentials["ann"])
    page.wait_for_function("document.querySelector('#left') && document.querySelector('#left').innerText.includes('film')")
    page.screenshot(path=str(artifacts_dir / "labeling_annotate.png"), full_page=False)
    assert page.evaluate("window.__pwned === undefined")  # the XSS payload in the response did not run
    assert "<script>" in page.inner_text("body")  # ...and is shown as text

    # Mouse: pick "Left is better", submit.
    page.get_by_label("Left is better").check()
    page.click("#submit-btn")
    page.wait_for_function("document.querySelector('#status').innerText.includes('1 done')")
    # Keyboard: 2 = right, Enter = submit.
    page.click("#prompt")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#status').innerText.includes('2 done')")
    # U = undo the last one.
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#status').innerText.includes('1 done')")
    votes = store.votes()
    assert len(votes) == 1 and votes[0]["annotator"] == "ann" and votes[0]["choice"] == votes[0]["left"]
    # A reload loses no submitted vote.
    page.reload()
    page.wait_for_function("document.querySelector('#status') && document.querySelector('#status').innerText.includes('1 done')")
    assert not page.locator("#export-btn").is_visible()  # no admin page for annotators
    page.close()


@pytest.mark.browser
def test_admin_sees_progress_and_exports(running_app, browser, artifacts_dir):
    url, credentials = running_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, url, "boss", credentials["boss"])
    page.get_by_role("tab", name="Admin").click()
    page.click("#refresh-btn")
    page.wait_for_selector("text=tasks complete")
    page.screenshot(path=str(artifacts_dir / "labeling_admin.png"), full_page=False)
    page.close()
