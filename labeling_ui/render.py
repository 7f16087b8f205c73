"""Text from models and people into what the page shows: a bounded Markdown subset, safe to render.

What models and annotators wrote may contain anything; the page must show it as text and never make the browser
fetch or run something because of it (a tracking pixel in a response would reach every annotator). A prompt that is
a whole conversation is shown as a chat (render_chat): one block per turn, its role named.
"""

from __future__ import annotations

import html
import re

MAX_SHOWN_CHARS = 20_000

# A bounded Markdown subset for what models and people wrote: paragraphs, emphasis, headings, lists, tables, code
# spans and fenced code. No raw HTML (escaped), no links or images (their brackets escaped: a response can make no
# browser fetch anything; and what GFM would turn into a link by itself, http://, www. and name@host, has its ':',
# '.' or '@' escaped), no indented code blocks (their indentation becomes no-break spaces). Code is emitted as
# our own <code>/<pre> HTML around escaped text, so `<` in code shows as `<` and a code span that Markdown would
# read differently can still only show text.
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
ENTITY_CHARS = set("&<>\"'")
PROSE = str.maketrans({"\\": "\\\\", "[": "\\[", "]": "\\]", "`": "\\`", "!": "\\!", "@": "\\@"})
AUTOLINK = re.compile(r"(?i):(?=//)|(?<=\bwww)\.")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain(text: str) -> str:
    """Text shown literally in Markdown (names, messages): every ASCII punctuation mark escaped, one line."""
    return "".join(html.escape(c) if c in ENTITY_CHARS else "\\" + c if c.isascii() and not c.isalnum()
                   and not c.isspace() else c for c in " ".join(str(text).split()))


def _prose(text: str) -> str:
    return AUTOLINK.sub(r"\\\g<0>", html.escape(text).translate(PROSE))


def _prose_line(line: str) -> str:
    indent = len(line) - len(line.lstrip(" \t"))
    out = ["\u00a0" * len(line[:indent].expandtabs(4))] if indent >= 4 else [line[:indent]]
    pos = indent
    for m in CODE_SPAN.finditer(line, indent):
        code = plain(m.group(2).strip(" ") or " ")
        out += [_prose(line[pos:m.start()]), f"<code>{code}</code>"]
        pos = m.end()
    return "".join(out) + _prose(line[pos:])


def render_markdown(text: str) -> str:
    """`text` in the bounded Markdown subset above."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            out.append(_prose_line(lines[i]))
            i += 1
            continue
        mark, body, i = opening.group(1), [], i + 1
        closing = re.compile(rf"^ {{0,3}}{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence (or the end: an unclosed fence closes here, not in the next text)
        out.append(f"\n<pre><code>{html.escape(chr(10).join(body))}</code></pre>\n")
    return "\n".join(out)


def render_text(text: str) -> str:
    """Model output or an annotator's text as safe Markdown (render_markdown), very long text cut."""
    cut = len(text) > MAX_SHOWN_CHARS
    shown = render_markdown(text[:MAX_SHOWN_CHARS])
    return shown + (f"\n\n*… {len(text) - MAX_SHOWN_CHARS:,} more characters not shown*" if cut else "")


def render_chat(messages: list[dict]) -> str:
    """A prompt's messages as a chat: one block per turn (class `turn turn-<role>`), its role named above its text
    (render_text). Our own <div>s around the Markdown, each followed by a blank line so that the Markdown inside is
    still read as Markdown; the role goes in only escaped, and into the class only when it is one we know."""
    turns = []
    for m in messages:
        role = str(m["role"])
        kind = role if role in ROLE_NAMES else "other"
        name = ROLE_NAMES.get(role) or html.escape(role)
        turns.append(f'<div class="turn turn-{kind}"><div class="turn-role">{name}</div><div class="turn-text">\n\n'
                     f'{render_text(str(m["content"]))}\n\n</div></div>')
    note = (f'<div class="chat-note">A conversation of {len(messages)} turns; what you judge is the reply to its last '
            'turn.</div>\n' if len(messages) > 1 else "")
    return f'<div class="chat">\n{note}' + "\n".join(turns) + "\n</div>"
