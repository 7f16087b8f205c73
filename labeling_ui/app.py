"""The labeling app: annotators compare two responses in a browser; admins watch progress and export.

Thin over rlhf.store: every handler below is a plain function of (store, user, ...) that the tests call without
a browser, and the Gradio page only wires them to buttons. Who the user is comes from Gradio's login (checked
against the store's hashed credentials), never from anything the page sends; admin handlers check the role on
the server, so hiding the admin tab is a convenience, not the protection.

    rlhf annotators add alice          # prints alice's credential once
    rlhf label --db sqlite:///runs/demo/store.db
"""

from __future__ import annotations

import html
import random
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from rlhf.config import UserError, field
from rlhf.store import AlreadyVoted, Store, TaskFull

MAX_SHOWN_CHARS = 20_000
CHOICE_TO_LABEL = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both bad"}
STRENGTHS = {"slight": 1, "clear": 2, "strong": 3}

DEFAULT_GUIDELINES = """**Which response answers the prompt better?** Judge helpfulness, honesty and harmlessness first,
then clarity. Ignore which side a response is on, and do not reward length for its own sake.

* **Left / Right is better**: pick the better one; say how sure you are (slight, clear, strong).
* **Tie**: both are about equally good. **Both bad**: neither is acceptable.
* Keys: `1`/`A` left, `2`/`B` right, `3`/`T` tie, `4`/`X` both bad, `Enter` submit, `S` skip, `U` or `Ctrl+Z` undo.
"""


@dataclass
class LabelConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    host: str = field("127.0.0.1", "Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: the network).")
    port: int = field(7860, "Port.")
    guidelines: str = field("", "Markdown file with the labeling guidelines ('' = the built-in ones).")
    guideline_version: str = field("v1", "Version stored with every vote, so guideline changes can be traced.")
    round: int = field(-1, "Only hand out tasks of this round (-1: any).")
    undo_window_s: float = field(300.0, "How long after a vote its annotator may still undo it.")

    def __post_init__(self):
        if not 0 < self.port < 65536 or self.undo_window_s < 0:
            raise ValueError("port must be in 1-65535 and undo_window_s >= 0")


def render_text(text: str) -> str:
    """Model output as safe Markdown: HTML escaped (so it shows as text, never runs), very long text cut."""
    cut = len(text) > MAX_SHOWN_CHARS
    shown = html.escape(text[:MAX_SHOWN_CHARS])
    return shown + (f"\n\n*… {len(text) - MAX_SHOWN_CHARS:,} more characters not shown*" if cut else "")


# ---------------------------------------------------------------- handlers (no Gradio in here)


def next_for(store: Store, user: str, round_: int | None, rng: random.Random) -> dict:
    """The next task for `user` as what the page shows: prompt, left and right text, and the hidden order."""
    task = store.next_task(user, round=round_)
    progress = store.progress(annotator=user, round=round_)
    status = f"{progress['done']} done by you · {progress['votes']}/{progress['slots']} votes overall"
    if task is None:
        return {"task_id": None, "status": status + " · nothing left to label — thank you!"}
    left_is_a = rng.random() < 0.5  # the order is random per task and stored with the vote
    a, b = task.responses[0], task.responses[1]
    prompt = "\n\n".join(f"**{m['role']}:** {render_text(m['content'])}" for m in task.prompt)
    return {"task_id": task.id, "left_is_a": left_is_a, "shown_at": time.time(), "status": status,
            "prompt": prompt, "left": render_text(a if left_is_a else b), "right": render_text(b if left_is_a else a)}


def vote(store: Store, user: str, current: dict, choice: str, strength: str, rationale: str,
         guideline_version: str) -> str:
    """Store the vote for the task on screen; returns a one-line message for the page."""
    if not current or current.get("task_id") is None:
        return "No task on screen."
    if choice not in CHOICE_TO_LABEL:
        return "Choose first: left, right, tie or both bad (keys 1-4)."
    if strength not in STRENGTHS:
        return "Choose how sure you are: slight, clear or strong."
    left_is_a = current["left_is_a"]
    stored = {"left": "A" if left_is_a else "B", "right": "B" if left_is_a else "A"}.get(choice, choice)
    try:
        store.submit(user, current["task_id"], stored, strength=STRENGTHS[strength], rationale=rationale.strip(),
                     left="A" if left_is_a else "B", guideline_version=guideline_version,
                     seconds=round(time.time() - current["shown_at"], 2))
    except AlreadyVoted:
        return "You had already voted on that one."
    except TaskFull:
        return "That task got all its votes meanwhile; here is another."
    return f"Saved: {CHOICE_TO_LABEL[choice].lower()} ({strength})."


def undo(store: Store, user: str, window_s: float) -> str:
    task_id = store.undo_last(user, window_s=window_s)
    return "Your last vote was undone; it is back in your queue." if task_id else "Nothing to undo."


def require_admin(store: Store, user: str) -> None:
    if store.annotator(user).role != "admin":
        raise PermissionError(f"{user} is not an admin")


def admin_overview(store: Store, user: str) -> str:
    """Progress and quality figures as Markdown (admins only)."""
    from rlhf.data import format_stats, quality_stats

    require_admin(store, user)
    p = store.progress()
    stats = format_stats(quality_stats(store.tasks()))
    return (f"**{p['complete_tasks']}/{p['tasks']} tasks complete, {p['votes']}/{p['slots']} votes**\n\n"
            f"```\n{stats}\n```")


def admin_export(store: Store, user: str, out: str) -> str:
    from rlhf.data import ExportConfig, run_export

    require_admin(store, user)
    counts = run_export(ExportConfig(db=store.url, out=out))
    return f"Exported {counts['train']} train, {counts['test']} test, {counts['ties']} ties to `{html.escape(out)}`."


# ---------------------------------------------------------------- the page

KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type === 'text'))) return;
  const pick = (v) => document.querySelector(`#choice input[value="${v}"]`)?.click();
  const click = (id) => document.querySelector(`#${id}`)?.click();
  const k = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && k === 'z') { e.preventDefault(); click('undo-btn'); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const choices = {'1': 'left', 'a': 'left', '2': 'right', 'b': 'right', '3': 'tie', 't': 'tie', '4': 'both_bad', 'x': 'both_bad'};
  if (k in choices) { e.preventDefault(); pick(choices[k]); }
  else if (k === 'enter') { e.preventDefault(); click('submit-btn'); }
  else if (k === 's') { e.preventDefault(); click('skip-btn'); }
  else if (k === 'u') { e.preventDefault(); click('undo-btn'); }
});
</script>
"""

CSS = """
.response { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 4px 14px;
            max-height: 42vh; overflow-y: auto; overflow-wrap: anywhere; }
#prompt { background: var(--background-fill-secondary); border-radius: 10px; padding: 4px 14px; }
#status { color: var(--body-text-color-subdued); }
"""


def build_app(config: LabelConfig, store: Store | None = None):
    store = store or Store(config.db or None)
    guidelines = Path(config.guidelines).read_text() if config.guidelines else DEFAULT_GUIDELINES
    round_ = None if config.round < 0 else config.round
    rng = random.Random()
    empty = {"task_id": None}

    def show(task: dict, message: str = ""):
        has = task.get("task_id") is not None
        return (task, f"{task['status']}" + (f" · {message}" if message else ""),
                task.get("prompt", "*Nothing left to label.*"), task.get("left", ""), task.get("right", ""),
                gr.update(value=None, interactive=has), gr.update(value=""), gr.update(interactive=has))

    def on_load(request: gr.Request):
        user = request.username
        is_admin = store.annotator(user).role == "admin"
        return (*show(next_for(store, user, round_, rng)), gr.update(visible=is_admin), f"Signed in as **{html.escape(user)}**")

    def on_submit(current, choice, strength, rationale, request: gr.Request):
        message = vote(store, request.username, current, choice, strength, rationale or "", config.guideline_version)
        if message.startswith("Choose") or message.startswith("No task"):
            return (current, message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        return show(next_for(store, request.username, round_, rng), message)

    def on_skip(current, request: gr.Request):
        if current and current.get("task_id") is not None:
            store.skip(request.username, current["task_id"])
        return show(next_for(store, request.username, round_, rng), "Skipped.")

    def on_undo(request: gr.Request):
        message = undo(store, request.username, config.undo_window_s)
        return show(next_for(store, request.username, round_, rng), message)

    def on_overview(request: gr.Request):
        try:
            return admin_overview(store, request.username)
        except PermissionError:
            return "Admins only."

    def on_export(out, request: gr.Request):
        try:
            return admin_export(store, request.username, out)
        except PermissionError:
            return "Admins only."
        except UserError as e:
            return f"Export failed: {html.escape(str(e))}"

    with gr.Blocks(title="rlhf · labeling") as app:
        current = gr.State(empty)
        with gr.Row():
            gr.Markdown("## Which response is better?")
            who = gr.Markdown(elem_id="who")
        status = gr.Markdown(elem_id="status")
        with gr.Tab("Annotate"):
            with gr.Accordion(f"Guidelines ({config.guideline_version})", open=False):
                gr.Markdown(guidelines)
            prompt = gr.Markdown(elem_id="prompt")
            with gr.Row(equal_height=False):
                with gr.Column():
                    gr.Markdown("**Left** · key `1`")
                    left = gr.Markdown(elem_classes="response", elem_id="left")
                with gr.Column():
                    gr.Markdown("**Right** · key `2`")
                    right = gr.Markdown(elem_classes="response", elem_id="right")
            choice = gr.Radio([(label, value) for value, label in CHOICE_TO_LABEL.items()], label="Your choice",
                              elem_id="choice")
            strength = gr.Radio(list(STRENGTHS), value="clear", label="How sure?", elem_id="strength")
            rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rationale")
            with gr.Row():
                submit = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
                skip = gr.Button("Skip (S)", elem_id="skip-btn")
                undo_btn = gr.Button("Undo last vote (U)", elem_id="undo-btn")
        with gr.Tab("Admin", visible=False) as admin_tab:
            overview = gr.Markdown()
            refresh = gr.Button("Refresh progress and agreement", elem_id="refresh-btn")
            out = gr.Textbox(value="runs/export", label="Export directory")
            export_btn = gr.Button("Export preference data (TRL format)", elem_id="export-btn")
            export_msg = gr.Markdown(elem_id="export-msg")

        screen = [current, status, prompt, left, right, choice, rationale, submit]
        app.load(on_load, None, screen + [admin_tab, who], api_visibility="private")
        submit.click(on_submit, [current, choice, strength, rationale], screen, api_visibility="private")
        skip.click(on_skip, [current], screen, api_visibility="private")
        undo_btn.click(on_undo, None, screen, api_visibility="private")
        refresh.click(on_overview, None, overview, api_visibility="private")
        export_btn.click(on_export, [out], export_msg, api_visibility="private")
    return app


def launch(config: LabelConfig, block: bool = True):
    store = Store(config.db or None)
    if not any(a.active and not a.simulated for a in store.list_annotators()):
        raise UserError(f"no annotator accounts in {store.url}: create one with `rlhf annotators add NAME` "
                        "(add --admin for the admin page)")
    app = build_app(config, store)

    def check(username: str, password: str) -> bool:
        return store.authenticate(username, password) is not None

    print(f"labeling app for {store.url} on http://{config.host}:{config.port}")
    app.launch(server_name=config.host, server_port=config.port, auth=check, prevent_thread_lock=not block,
               auth_message="Sign in with your annotator name and the credential `rlhf annotators add` printed.",
               css=CSS, head=KEYS_JS, show_error=False, footer_links=[])
    return app
