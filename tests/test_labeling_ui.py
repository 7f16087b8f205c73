"""The labeling app: handlers without a browser, then the real page in Chromium."""

from __future__ import annotations

import contextlib
import random
import re
import socket

import pytest

from labeling_ui.app import (
    LabelConfig,
    admin_add_annotator,
    admin_add_prompts,
    admin_export,
    admin_overview,
    admin_queue,
    admin_review,
    arena_vote,
    build_app,
    describe_order,
    leaderboard,
    page_assets,
    render_text,
)
from labeling_ui.render import render_chat
from rlhf.arena import Arena, ask_both, parse_contestants
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


def test_admin_handlers_refuse_annotators(store, tmp_path):
    store.add_annotator("ann")
    store.add_annotator("boss", role="admin")
    with pytest.raises(PermissionError):
        admin_overview(store, "ann")
    with pytest.raises(PermissionError):
        admin_export(store, "ann", str(tmp_path / "out"))
    for handler, args in ((admin_queue, ()), (admin_review, (1, "kept")), (admin_add_prompts, ("x", "train")),
                          (admin_add_annotator, ("mallory", True))):
        with pytest.raises(PermissionError):
            handler(store, "ann", *args)
    assert store.annotator("boss").role == "admin" and "mallory" not in [a.name for a in store.list_annotators()]
    shown = admin_overview(store, "boss")
    assert "tasks complete" in shown and "ratings: 0/0 complete, 0/0 votes" in shown
    assert admin_export(store, "boss", str(tmp_path / "out")).startswith("Exported")
    message = admin_add_prompts(store, "boss", "First new prompt\n\n  Second new prompt  \n", "test")
    assert message.startswith("Stored 2")
    assert store.random_prompt(split="test")[0]["content"] in ("First new prompt", "Second new prompt")
    message = admin_add_annotator(store, "boss", "carol", False)
    credential = message.rsplit("`", 2)[1]
    assert store.authenticate("carol", credential).role == "annotator"
    assert admin_add_annotator(store, "boss", "carol", False) == "an annotator named &#x27;carol&#x27; exists already"


def test_the_typed_order_is_shown_as_chips_and_read_out_escaped():
    shown = describe_order("3=1 4 2", 4)
    assert "Your order: #3 = #1 > #4 > #2" in shown
    assert [int(n) for n in re.findall(r'data-n="(\d)"', shown)] == [3, 1, 4, 2]
    assert [int(n) for n in re.findall(r'data-n="(\d)"', describe_order("2", 4))] == [2, 1, 3, 4]
    assert "&lt;" in describe_order("<b>", 4) and "<b>" not in describe_order("<b>", 4)


def test_arena_two_anonymous_models_then_the_reveal_and_leaderboard(store, tiny_model_dir):
    contestants = parse_contestants([f"base={tiny_model_dir}", f"prompted={tiny_model_dir}|Be very positive."])
    assert contestants[1]["name"] == f"{tiny_model_dir} | system: Be very positive."
    with pytest.raises(ValueError):
        parse_contestants(["no-equals-sign"])
    arena = Arena(contestants, precision="fp32", max_new_tokens=8)
    store.add_annotator("fan")
    rng = random.Random(0)
    for i in range(3):
        current = ask_both(store, arena, f"Tell me about film {i}.", rng)
        assert current["task_id"] is not None and sorted(current["labels"]) == ["base", "prompted"]
        reveal = arena_vote(store, "fan", current, "A" if i < 2 else "tie")
        assert f"**A** was **{current['labels'][0]}**" in reveal
        assert arena_vote(store, "fan", current, "B").startswith("This one has its vote")
    assert ask_both(store, arena, "   ", rng)["task_id"] is None
    tasks = store.tasks(kind="arena")
    assert len(tasks) == 3 and all(len(t["votes"]) == 1 for t in tasks)
    assert {r["model"] for t in tasks for r in t["responses"]} == {c["name"] for c in contestants}
    board = leaderboard(store, arena)
    assert "| base |" in board and "| prompted |" in board and "3 votes" in board
    assert all(t["how"] != "arena" for t in store.tasks())  # arena votes never become training pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(store, tiny_model_dir, tiny_reward_dir):
    """The app on localhost with a reward model (the tiny one) and an arena of the tiny model vs a prompt baseline."""
    from rlhf.reward import RewardModel

    credentials = {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", role="admin")}
    port = _free_port()
    arena = Arena(parse_contestants([f"base={tiny_model_dir}", f"prompted={tiny_model_dir}|Be positive."]),
                  precision="fp32", max_new_tokens=6)
    # No swapped repeats here: one (5 % of draws) would not count as "done" and the page checks below count votes.
    app = build_app(LabelConfig(db=store.url, port=port, repeat_share=0.0), store,
                    scorer=RewardModel.load(tiny_reward_dir, precision="fp32"), arena=arena)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, footer_links=[],
               auth=lambda u, p: store.authenticate(u, p) is not None, **page_assets())
    yield f"http://127.0.0.1:{port}", credentials, app
    app.close()


def _sign_in(page, url, user, credential):
    page.goto(url)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", credential)
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-btn", timeout=30_000)


@pytest.mark.browser
def test_annotator_votes_with_mouse_and_keyboard_in_chromium(running_app, browser, artifacts_dir, store):
    url, credentials, _ = running_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, url, "ann", credentials["ann"])
    page.wait_for_function("document.querySelector('#left') && "
                           "document.querySelector('#left').innerText.includes('film')")
    page.screenshot(path=str(artifacts_dir / "labeling_annotate.png"), full_page=False)
    assert page.evaluate("window.__pwned === undefined")  # the XSS payload in the response did not run
    assert "<script>" in page.inner_text("body")  # ...and is shown as text

    # Mouse: pick "Left is better", submit.
    assert "strong: the other is wrong or harmful" in page.inner_text("#strength")  # what "how sure" means
    judged = page.inner_text("#prompt .turn-text")
    page.get_by_label("Left is better").check()
    page.click("#submit-btn")
    page.wait_for_function("document.querySelector('#status').innerText.includes('1 done')")
    # The reward model's verdict shows only now, after the vote, named by the pair it judged (the next is on screen).
    verdict = page.inner_text("#verdict")
    assert "Your last vote" in verdict and "The reward model gives the left response" in verdict
    assert " ".join(judged.split())[:40] in " ".join(verdict.split())
    # Keyboard: 2 = right, E = strong, Enter = submit.
    page.click("#prompt")
    page.keyboard.press("2")
    page.keyboard.press("e")
    assert page.is_checked("#strength input[value=strong]")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#status').innerText.includes('2 done')")
    page.screenshot(path=str(artifacts_dir / "labeling_verdict.png"), full_page=False)
    # U = undo the last one; the verdict about it goes with it.
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#status').innerText.includes('1 done')")
    page.wait_for_function("!document.querySelector('#verdict').innerText.includes('Your last vote')")
    votes = store.votes()
    assert len(votes) == 1 and votes[0]["annotator"] == "ann" and votes[0]["choice"] == votes[0]["left"]
    # A reload loses no submitted vote.
    page.reload()
    page.wait_for_function("document.querySelector('#status') && "
                           "document.querySelector('#status').innerText.includes('1 done')")
    assert not page.locator("#export-btn").is_visible()  # no admin page for annotators
    page.close()


def _exported_files(directory) -> dict[str, bytes]:
    """An export's files, but export.json's config (it names where the export was written)."""
    import json

    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    files["export.json"] = json.dumps(json.loads(files["export.json"])["counts"]).encode()
    return files


@pytest.mark.browser
def test_admin_sees_progress_adds_an_annotator_and_exports(running_app, browser, artifacts_dir, store, tmp_path):
    import io
    import json
    import zipfile

    from rlhf.data import ExportConfig, run_export

    url, credentials, _ = running_app
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    _sign_in(page, url, "boss", credentials["boss"])
    page.get_by_role("tab", name="Admin").click()
    # The figures are there without pressing anything, and follow the votes on their own.
    page.wait_for_function("document.querySelector('#overview').innerText.includes('0/6 votes')")
    store.submit("ann", store.tasks()[0]["task_id"], "A")
    page.wait_for_function("document.querySelector('#overview').innerText.includes('1/6 votes')", timeout=30_000)
    page.get_by_text("Add an annotator").click()
    page.fill("#new-name input, #new-name textarea", "dora")
    page.click("#add-annotator-btn")
    page.wait_for_selector("#add-annotator-msg code")
    credential = page.inner_text("#add-annotator-msg code")
    assert store.authenticate("dora", credential).role == "annotator"
    # The download: the same files `rlhf data export` writes.
    with page.expect_download() as download:
        page.click("#export-download")
    saved = tmp_path / "download.zip"
    download.value.save_as(saved)
    assert download.value.suggested_filename.startswith("rlhf-export-")
    run_export(ExportConfig(db=store.url, out=str(tmp_path / "cli")))
    with zipfile.ZipFile(io.BytesIO(saved.read_bytes())) as archive:
        zipped = {name: archive.read(name) for name in sorted(archive.namelist())}
    zipped["export.json"] = json.dumps(json.loads(zipped["export.json"])["counts"]).encode()
    assert zipped == _exported_files(tmp_path / "cli") and b"Great film" in zipped["tasks.jsonl"]
    # And to a directory on the server, as before.
    page.fill("label:has-text('directory on the server') textarea, label:has-text('directory on the server') input",
              str(tmp_path / "exported"))
    page.click("#export-btn")
    page.wait_for_selector("#export-msg :text('Exported')")
    assert (tmp_path / "exported" / "train.jsonl").exists()
    page.screenshot(path=str(artifacts_dir / "labeling_admin.png"), full_page=True)
    page.close()


def _record_a_run(store, tmp_path):
    """A loop run's first round as the loop records it (rlhf.rounds), with a report that tries to run a script."""
    from rlhf.rounds import record_step

    root = tmp_path / "runs" / "demo"
    (root / "round-1" / "eval").mkdir(parents=True)
    (root / "round-1" / "eval" / "report.html").write_text(
        "<html><body><h1>report of round 1</h1><script>document.title = 'ran'; window.__pwned = 4</script>"
        "</body></html>")
    record_step(store, root, "demo", 1, "generate", {"tasks": 3})
    record_step(store, root, "demo", 1, "export", {"train": 120, "test": 30, "ties": 2})
    record_step(store, root, "demo", 1, "reward", {
        "test_pairs": 30, "accuracy": 0.7, "accuracy_ci": [0.6, 0.8], "train_pairs": 120, "verdict": "better",
        "ceiling": {"value": 0.9, "ci": [0.85, 0.95]}})
    record_step(store, root, "demo", 1, "evaluate", {
        "config": {"output_dir": str(root / "round-1" / "eval")}, "best_prompt_baseline": "prompt", "models": [
            {"label": "dpo <b>x</b>", "role": "aligned", "win_rate_gold": 0.8, "win_rate_gold_ci": [0.7, 0.9],
             "win_rate_gold_vs_prompt": 0.66, "win_rate_gold_vs_prompt_ci": [0.55, 0.77], "kl_vs_base": 7.5}]})
    return root


def test_the_rounds_page_names_what_it_counts_and_escapes_names(store, tmp_path):
    from labeling_ui.app import rounds_markdown, rounds_plots
    from rlhf import labeling
    from rlhf.rounds import record_step

    store.add_annotator("boss", role="admin")
    store.add_annotator("ann")
    assert rounds_markdown(labeling.rounds(store, "boss")).startswith("*No loop run has recorded rounds")
    with pytest.raises(PermissionError):
        labeling.rounds(store, "ann")
    record_step(store, tmp_path / "r", "<b>run</b>", 0, "generate", {})  # the fixture's 3 pair tasks are round 0
    store.submit("ann", store.tasks()[0]["task_id"], "A")
    store.submit_rating("ann", _rate_task(store, "Rate this.", "An answer."), "up")
    runs = labeling.rounds(store, "boss")
    shown = rounds_markdown(runs)
    [row] = [line for line in shown.splitlines() if line.startswith("| 0 |")]
    assert "pairs: 1/6 votes, 0/3 done" in row and "ratings: 1/1 votes, 1/1 done" in row and "rankings" not in row
    assert "<b>" not in shown and "Run &lt;b&gt;run" in shown
    assert "| ann | 2 | 0 |" in shown  # the latest round, per annotator (a vote and a rating)
    accuracy, wins = rounds_plots(runs)  # nothing measured yet: the plots say so rather than fail
    assert accuracy.axes[0].texts[0].get_text() == "nothing measured yet"


@pytest.mark.browser
def test_admin_follows_the_loops_rounds_and_opens_a_report(running_app, browser, artifacts_dir, store, tmp_path):
    from rlhf.rounds import record_step, run_key

    url, credentials, _ = running_app
    root = _record_a_run(store, tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    _sign_in(page, url, "boss", credentials["boss"])
    page.get_by_role("tab", name="Rounds").click()
    page.wait_for_function("document.querySelector('#rounds').innerText.includes('Run demo')")
    shown = page.inner_text("#rounds")
    assert "70.0 % [60, 80] on 30 pairs" in shown and "90.0 % [85, 95]" in shown  # beside the ceiling
    assert "80.0 % [70, 90]" in shown and "66.0 % [55, 77]" in shown and "7.50" in shown
    assert "dpo <b>x</b>" in shown  # a name is shown as text
    page.wait_for_selector("#rounds-accuracy img")  # the plot, drawn on the server
    # Round 2 starts while the page is open: it appears on its own, with its labeling progress.
    record_step(store, root, "demo", 2, "generate", {"tasks": 3})
    page.wait_for_function("document.querySelector('#rounds').innerText.includes('generate')"
                           " && document.querySelectorAll('#rounds table')[0].rows.length === 3", timeout=30_000)
    page.screenshot(path=str(artifacts_dir / "labeling_rounds.png"), full_page=True)
    # The report opens from the page, served as a sandbox: its script does not run.
    link = page.locator("#rounds a", has_text="open").first
    assert link.get_attribute("href") == f"/rlhf/report/{run_key(root)[len('loop:'):]}/1"
    with page.context.expect_page() as opened:
        link.click(modifiers=["Control"])
    report = opened.value
    report.wait_for_load_state()
    assert "report of round 1" in report.inner_text("body") and report.title() != "ran"
    response = page.request.get(url + link.get_attribute("href"))
    assert response.ok and "sandbox" in response.headers["content-security-policy"]
    report.close()
    page.close()


def test_the_downloads_answer_admins_only(running_app, store, tmp_path):
    import httpx

    from rlhf.rounds import run_key

    url, credentials, _ = running_app
    root = _record_a_run(store, tmp_path)
    report = f"/rlhf/report/{run_key(root)[len('loop:'):]}/1"

    def get(path: str, who: str | None) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=30) as client:
            if who:
                client.post("/login", data={"username": who, "password": credentials[who]})
            return client.get(path)

    for who in (None, "ann"):  # no sign-in, an annotator: nothing, and no hint what is there
        assert get("/rlhf/export.zip", who).status_code == 404 and get(report, who).status_code == 404
    zipped = get("/rlhf/export.zip", "boss")
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    assert zipped.content[:2] == b"PK" and "attachment" in zipped.headers["content-disposition"]
    assert get(report, "boss").status_code == 200
    # Only a recorded round's report file: another round, another run, a path are not served.
    for path in (report[:-1] + "2", "/rlhf/report/0123456789abcdef/1", report + "/../../../etc/passwd",
                 "/rlhf/report/x/1", report[:-1] + "1x"):
        assert get(path, "boss").status_code == 404


@pytest.mark.browser
def test_ranking_four_responses_with_the_keyboard(running_app, browser, artifacts_dir, store):
    url, credentials, _ = running_app
    [pid] = store.add_prompts(["Rank these four film reviews."])
    ids = store.add_responses(pid, ["Review zero.", "Review one <b>bold?</b>", "Review two.", "Review three."],
                              model="m")
    task_id = store.add_task(ids, kind="rank", overlap=1)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, url, "ann", credentials["ann"])
    page.get_by_role("tab", name="Rank several").click()
    page.wait_for_selector("#card-4", state="visible")
    shown = [page.inner_text(f"#card-{i}") for i in range(1, 5)]
    page.click("#rank-prompt")
    for key in "3142":
        page.keyboard.press(key)
    page.wait_for_function("document.querySelector('#rank-preview').innerText.includes('#3 > #1 > #4 > #2')")
    page.screenshot(path=str(artifacts_dir / "labeling_rank.png"), full_page=False)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#rank-status').innerText.includes('1 ranked by you')")
    [v] = store.tasks(kind="rank")[0]["votes"]
    position = {f"Review {w}": p for p, w in enumerate(["zero", "one", "two", "three"])}

    def position_of(card_text: str) -> int:
        return next(p for text, p in position.items() if text in card_text)

    assert v["ranking"] == [[position_of(shown[n - 1])] for n in (3, 1, 4, 2)]
    assert v["shown"] == [position_of(t) for t in shown] and store.tasks(kind="rank")[0]["task_id"] == task_id
    page.keyboard.press("u")  # undo works as for pairs
    page.wait_for_function("document.querySelector('#rank-status').innerText.includes('0 ranked by you')")
    assert store.tasks(kind="rank")[0]["votes"] == []
    # The mouse: drag #4 in front of #1 (the strip starts 1 2 3 4), then submit with the button.
    page.wait_for_selector('#rank-strip .rank-chip[data-n="4"]')
    page.drag_and_drop('#rank-strip .rank-chip[data-n="4"]', '#rank-strip .rank-chip[data-n="1"]',
                       target_position={"x": 2, "y": 5})
    page.wait_for_function("document.querySelector('#rank-preview').innerText.includes('#4 > #1 > #2 > #3')")
    shown = [page.inner_text(f"#card-{i}") for i in range(1, 5)]
    page.click("#rank-submit-btn")
    page.wait_for_function("document.querySelector('#rank-status').innerText.includes('1 ranked by you')")
    [v] = store.tasks(kind="rank")[0]["votes"]
    assert v["ranking"] == [[position_of(shown[n - 1])] for n in (4, 1, 2, 3)]
    page.close()


@pytest.mark.browser
def test_arena_vote_reveals_the_models_and_updates_the_leaderboard(running_app, browser, artifacts_dir, store):
    url, credentials, _ = running_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, url, "ann", credentials["ann"])
    page.get_by_role("tab", name="Arena").click()
    page.fill("#arena-prompt textarea", "Write one line about a <script>window.__pwned = 3</script> film.")
    page.click("#arena-ask-btn")
    page.wait_for_selector("#arena-a-btn", state="visible", timeout=60_000)
    page.click("#arena-prompt")
    page.keyboard.press("Escape")
    page.click("#arena-msg")
    page.keyboard.press("1")  # A is better
    page.wait_for_function("document.querySelector('#arena-msg').innerText.includes('was')")
    page.wait_for_function("document.querySelector('#leaderboard').innerText.includes('prompted')")
    assert page.evaluate("window.__pwned === undefined")
    page.screenshot(path=str(artifacts_dir / "labeling_arena.png"), full_page=True)
    [task] = store.tasks(kind="arena")
    assert [v["choice"] for v in task["votes"]] == ["A"] and task["votes"][0]["annotator"] == "ann"
    page.close()


def _call_event(url: str, user: str, credential: str, fn_index: int, data: list):
    """Call one of the page's events the way a script would, over HTTP (login, queue/join, read the stream)."""
    import json
    import uuid

    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/login", data={"username": user, "password": credential})  # a refused login sets no cookie
        session = uuid.uuid4().hex
        joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                             "session_hash": session, "event_data": None,
                                                             "trigger_id": None})
        if joined.status_code != 200:
            return {"refused": joined.status_code}
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message["output"]
    return None


def test_a_non_admin_cannot_reach_admin_functions_over_http(running_app, store, tmp_path):
    url, credentials, app = running_app
    by_name = {fn.name: index for index, fn in app.fns.items()}
    target = tmp_path / "stolen"
    # The page's private events answer an HTTP caller (the browser is one), so the server-side role check is what
    # protects them: it answers a signed-in annotator "Admins only." and does nothing.
    assert _call_event(url, "ann", credentials["ann"], by_name["on_export"], [str(target)])["data"] == ["Admins only."]
    assert not target.exists()
    output = _call_event(url, "ann", credentials["ann"], by_name["on_add_annotator"], ["eve", True])
    assert output["data"] == ["Admins only."] and "eve" not in [a.name for a in store.list_annotators()]
    output = _call_event(url, "nobody", "wrong", by_name["on_export"], [str(target)])
    assert output == {"refused": 401} and not target.exists()  # without a sign-in nothing runs at all
    # The same call by the admin works (so the refusal above is the role check, not a broken call).
    output = _call_event(url, "boss", credentials["boss"], by_name["on_export"], [str(target)])
    assert output["data"][0].startswith("Exported") and target.exists()


def test_the_app_starts_without_torch_and_ships_its_static_files():
    """The page's module imports neither torch nor transformers (they load with a reward model or arena models)."""
    import subprocess
    import sys

    code = ("import sys, labeling_ui.app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in ('torch', 'transformers') if m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assets = page_assets()
    assert all(path.is_file() for path in assets["css_paths"]) and "#rank-strip" in assets["css_paths"][0].read_text()
    assert assets["head"].strip().startswith("<script>") and "keydown" in assets["head"]


def test_render_text_is_a_bounded_markdown_subset():
    shown = render_text("![](http://h/p.png) [x](http://h/) <img src=http://h/q.png> `a < b` \\`")
    assert "![" not in shown.replace("\\!\\[", "") and "](" not in shown.replace("\\](", "")
    assert "<img" not in shown and "<code>a &lt; b</code>" in shown
    fenced = render_text("```\nif a < b:\n\n    <script>x</script>\n")  # unclosed: closed here
    assert fenced.strip().startswith("<pre><code>") and fenced.strip().endswith("</code></pre>")
    assert "&lt;script&gt;" in fenced and "<script>" not in fenced
    assert render_text("    indented < code").startswith("\u00a0" * 4)  # no indented code block showing &lt;


@contextlib.contextmanager
def _plain_app(store: Store):
    """The app on localhost over `store`, without a reward model or arena (quick to start); yields its URL."""
    port = _free_port()
    app = build_app(LabelConfig(db=store.url, port=port, repeat_share=0.0), store)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, footer_links=[], **page_assets())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.close()


@pytest.mark.browser
def test_a_response_cannot_make_the_browser_fetch_and_code_shows_its_angle_brackets(tmp_path, browser):
    import http.server
    import threading

    hits = []

    class Counter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    pixel = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=pixel.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{pixel.server_address[1]}"
    store = Store(f"sqlite:///{tmp_path / 'md.db'}")
    [pid] = store.add_prompts([f"Describe ![]({host}/prompt.png) this."])
    response = (f"Look: ![]({host}/pixel.png) and [ref][1] and <img src=\"{host}/raw.png\">\n\n[1]: {host}/ref.png\n\n"
                f"![alt][1] inline `a < b && c > d` and\n\n```\nif x < y:\n    print('<b>')\n```\n")
    store.add_task(store.add_responses(pid, [response, response], model="m"), overlap=1)
    credential = store.add_annotator("ann")
    try:
        with _plain_app(store) as url:
            page = browser.new_page()
            _sign_in(page, url, "ann", credential)
            page.wait_for_function("document.querySelector('#left code')")
            page.wait_for_timeout(1000)
            assert hits == []
            codes = [page.inner_text(c) for c in ("#left code >> nth=0", "#left pre")]
            assert codes[0] == "a < b && c > d" and "if x < y:" in codes[1] and "print('<b>')" in codes[1]
            assert page.locator("#left img, #prompt img").count() == 0
            page.close()
    finally:
        pixel.shutdown()


def test_a_conversation_is_rendered_turn_by_turn_each_escaped():
    chat = render_chat([{"role": "system", "content": "Be <b>brief</b>."}, {"role": "user", "content": XSS},
                        {"role": "assistant", "content": "See http://h/x or www.h.org, mail a@h.org"},
                        {"role": "user", "content": "And `<i>` **now**?"}])
    assert re.findall(r'<div class="turn turn-(\w+)"><div class="turn-role">(\w+)</div>', chat) == [
        ("system", "System"), ("user", "User"), ("assistant", "Assistant"), ("user", "User")]
    assert "4 turns" in chat and "<script>" not in chat and "<b>" not in chat and "<img" not in chat
    assert "&lt;script&gt;" in chat and "<code>&lt;i&gt;</code>" in chat
    # What GFM would make a link of by itself (a URL, www., an address) is escaped into text.
    assert "http\\://h/x" in chat and "www\\.h.org" in chat and "a\\@h.org" in chat
    assert len(re.findall(r'class="turn ', render_chat([{"role": "user", "content": "Hi"}]))) == 1
    assert "conversation" not in render_chat([{"role": "user", "content": "Hi"}])
    assert 'turn-other"><div class="turn-role">&lt;b&gt;' in render_chat([{"role": "<b>", "content": "x"}])


def _rate_task(store: Store, messages, answer: str) -> int:
    [pid] = store.add_prompts([messages])
    _, [task_id] = store.add_candidates(pid, [(answer, "m", {})], [], rate=True)
    return task_id


@pytest.mark.browser
def test_rating_by_keys_with_undo_and_a_score_in_chromium(running_app, browser, artifacts_dir, store):
    url, credentials, _ = running_app
    answer = "A warm, funny film about **two** brothers; I would see it again."
    task_id = _rate_task(store, [{"role": "system", "content": "You review films in one sentence."},
                                 {"role": "user", "content": "Review the film *Brothers* for a newspaper."}], answer)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    _sign_in(page, url, "ann", credentials["ann"])
    page.get_by_role("tab", name="Rate").click()
    page.wait_for_function("document.querySelector('#rate-response').innerText.includes('two brothers')")
    assert "1 thumbs up, 2 thumbs down" in page.inner_text("#rate-keys")  # the keys, on the page
    assert page.locator("#rate-prompt .turn").count() == 2  # the prompt as a chat
    # 1 = thumbs up: saved at once (no score given).
    page.click("#rate-prompt")
    page.keyboard.press("1")
    page.wait_for_function("document.querySelector('#rate-status').innerText.includes('1 rated by you')")
    assert "Saved: thumbs up." in page.inner_text("#rate-msg")
    [v] = store.votes(kind="rate")
    assert (v["task_id"], v["annotator"], v["choice"], v["likert"]) == (task_id, "ann", "up", None)
    # U = undo: the vote is gone and the same response is back on screen.
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#rate-status').innerText.includes('0 rated by you')")
    assert "undone" in page.inner_text("#rate-msg") and "two brothers" in page.inner_text("#rate-response")
    assert store.votes(kind="rate") == []
    # R = a score of 4, a reason typed (Esc leaves the box), then 2 = thumbs down saves all three.
    page.keyboard.press("r")
    assert page.is_checked("#rate-likert input[value='4']")
    page.fill("#rate-rationale textarea, #rate-rationale input", "Too <b>long</b> for one sentence.")
    page.keyboard.press("Escape")
    page.screenshot(path=str(artifacts_dir / "labeling_rate.png"), full_page=True)
    page.keyboard.press("2")
    page.wait_for_function("document.querySelector('#rate-status').innerText.includes('1 rated by you')")
    assert "Saved: thumbs down, 4 of 5." in page.inner_text("#rate-msg")
    [v] = store.votes(kind="rate")
    assert (v["choice"], v["likert"], v["rationale"]) == ("down", 4, "Too <b>long</b> for one sentence.")
    assert "Nothing left to rate" in page.inner_text("#rate-prompt")
    assert not page.is_enabled("#rate-up-btn")
    page.close()


@pytest.mark.browser
def test_an_edit_is_saved_exactly_and_shown_as_text_in_chromium(running_app, browser, artifacts_dir, store):
    url, credentials, _ = running_app
    edit = "<img src=x onerror=alert(1)> **bold** [link](http://x)"
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _sign_in(page, url, "ann", credentials["ann"])
    page.wait_for_function("document.querySelector('#left').innerText.includes('film')")
    side = "left" if "Dull film" in page.inner_text("#left") else "right"  # the long answer, on either side
    page.get_by_text("Improve this answer").first.click()
    page.get_by_label(side.title(), exact=True).check()
    # The box starts with the answer chosen, cut to what an edit may hold (and the page says so).
    page.wait_for_function("document.querySelector('#edit textarea').value.length > 0")
    draft = page.input_value("#edit textarea")
    assert draft.startswith("Dull film") and len(draft) == 20_000 and "first 20,000" in page.inner_text("#edit-msg")
    page.fill("#edit textarea", f"  {edit}\n\n")
    page.click("#edit-btn")
    page.wait_for_selector("#edit-saved", state="visible")
    assert "Saved your improved answer" in page.inner_text("#edit-msg")
    [task] = [t for t in store.tasks() if t["edits"]]
    [stored] = task["edits"]
    assert stored["annotator"] == "ann" and stored["text"] == edit  # exactly, but the surrounding whitespace
    assert store.edit_of("ann", task["task_id"], stored["position"]) == edit
    assert task["responses"][stored["position"]]["text"].startswith("Dull film")  # the answer chosen
    # Shown as text: the tag and the link's brackets as typed, no element made of them, nothing ran.
    shown = page.inner_text("#edit-saved")
    assert "<img src=x onerror=alert(1)>" in shown and "[link](http://x)" in shown and "bold" in shown
    assert page.locator("#edit-saved img, #edit-saved a, #edit-saved script").count() == 0
    page.screenshot(path=str(artifacts_dir / "labeling_edit.png"), full_page=True)
    # Saving again replaces the edit; the original response stays as it was.
    page.fill("#edit textarea", "Better: a short review.")
    page.click("#edit-btn")
    page.wait_for_function("document.querySelector('#edit-saved').innerText.includes('Better: a short review.')")
    assert store.edit_of("ann", task["task_id"], stored["position"]) == "Better: a short review."
    assert [t for t in store.tasks() if t["edits"]][0]["responses"] == task["responses"]
    assert dialogs == [] and page.evaluate("window.__pwned === undefined")
    page.close()


@pytest.mark.browser
def test_a_four_turn_conversation_shows_as_four_turns_in_chromium(tmp_path, browser, artifacts_dir):
    store = Store(f"sqlite:///{tmp_path / 'chat.db'}")
    conversation = [
        {"role": "system", "content": "You are a film critic. Answer in **two** sentences."},
        {"role": "user", "content": "What did you think of *Brothers*?"},
        {"role": "assistant", "content": "It was warm. <script>window.__pwned = 6</script> Also long."},
        {"role": "user", "content": "And the ending — too `<abrupt>`?"},
    ]
    [pid] = store.add_prompts([conversation])
    store.add_task(store.add_responses(pid, ["Yes, it ends too soon.", "No: it ends just right."], model="m"))
    credential = store.add_annotator("ann")
    with _plain_app(store) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        _sign_in(page, url, "ann", credential)
        page.wait_for_selector("#prompt .turn")
        turns = page.locator("#prompt .turn")
        assert turns.count() == 4
        assert page.locator("#prompt .turn-role").all_inner_texts() == ["System", "User", "Assistant", "User"]
        assert [turns.nth(i).get_attribute("class").split()[-1] for i in range(4)] == [
            "turn-system", "turn-user", "turn-assistant", "turn-user"]
        texts = page.locator("#prompt .turn-text").all_inner_texts()
        assert "<script>window.__pwned = 6</script>" in texts[2] and "two" in texts[0] and "<abrupt>" in texts[3]
        assert page.locator("#prompt script, #prompt a, #prompt img").count() == 0
        assert page.evaluate("window.__pwned === undefined")
        page.screenshot(path=str(artifacts_dir / "labeling_conversation.png"), full_page=True)
        page.close()
