"""Preference data in and out: TRL's preference format, Anthropic HH-RLHF text, JSONL/CSV/Parquet.

Every trainer (reward, DPO, PPO prompts) reads preferences through `load_preference_dataset`, whatever their
source: a store export directory, a single file, a `save_to_disk` directory, or a Hub dataset id.

The format is TRL's conversational preference format:
    prompt   list of {"role", "content"} messages, ending with the user turn
    chosen   [{"role": "assistant", "content": ...}]
    rejected [{"role": "assistant", "content": ...}]
    margin   optional float, how strongly chosen beats rejected (the vote's strength mapped by `margins`, or the
             margin an imported pair came with; 0 for an imported pair that had none, such as HH-RLHF's)
    edit     true for a pair made from an annotator's rewrite (edited > original): a trainer can keep or drop them
Plain-text rows (prompt/chosen/rejected as strings) are accepted and converted. Other columns (ids, round,
group) ride along; trainers keep only the columns they use.

An export also writes ratings (thumbs up or down on one response: KTO's unpaired format, prompt / completion /
label) as ratings_train and ratings_test, and edits as SFT demonstrations (edits: {"messages": [..., the edited
answer]}, which `rlhf sft --data` reads).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import UserError, field
from rlhf.data_quality import format_stats, quality_stats, ranking_agreement  # noqa: F401  (re-exported)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SHIPPED_PROMPTS = {"sentiment": Path(__file__).parent / "data" / "sentiment_prompts.jsonl"}
_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_conversational(row: dict) -> dict:
    """A preference row with string fields as the equivalent conversational row (others pass through)."""
    row = dict(row)
    row["prompt"] = _as_messages(row["prompt"], "user")
    row["chosen"] = _as_messages(row["chosen"], "assistant")
    row["rejected"] = _as_messages(row["rejected"], "assistant")
    return row


def _load_files(files: dict[str, list[str]]):
    from datasets import load_dataset

    kinds = {_FILE_TYPES[Path(f).suffix] for fs in files.values() for f in fs}
    if len(kinds) != 1:
        raise UserError(f"mixed file types in one dataset: {sorted(kinds)}")
    # Read and checked here first: `datasets` reports a bad byte, a malformed line or a hole as a traceback
    # without the line; this names file:line.
    for f in (f for fs in files.values() for f in fs):
        for lineno, row in _read_rows(Path(f)):
            for column in PREFERENCE_COLUMNS:
                if column in row and not (isinstance(row[column], (str, list)) and row[column]):
                    raise UserError(f"{f}:{lineno}: {column} must be text or a list of messages, not "
                                    f"{row[column]!r}")
    try:
        return load_dataset(kinds.pop(), data_files=files)
    except Exception as e:  # `datasets` and arrow raise many types; the user needs one line
        raise UserError(f"cannot load {', '.join(f for fs in files.values() for f in fs)}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def load_preference_dataset(spec: str, test_size: float = 0.1, seed: int = 0):
    """Load preferences as a DatasetDict with at least `train` (and `test`, split off by prompt if absent).

    spec: a directory of `<split>.{jsonl,parquet,csv}` files (what `rlhf data export` writes), a single such file,
    a `datasets.save_to_disk` directory, or a Hub dataset id (where a hub is reachable).
    """
    from datasets.utils import logging as datasets_logging

    # Without `datasets`' progress bars on stderr: an error stays the one line the CLI prints.
    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return _load_preferences(spec, test_size, seed)
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _load_preferences(spec: str, test_size: float, seed: int):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        data = load_from_disk(str(path))
    elif path.is_dir():
        files: dict[str, list[str]] = {}
        empty: set[str] = set()
        for f in sorted(path.iterdir()):
            if f.suffix in _FILE_TYPES and f.stem.split(".")[0] in ("train", "test", "validation"):
                # An empty split (an export with no test prompts) cannot be loaded; it is recreated empty below.
                (files.setdefault(f.stem.split(".")[0], []).append(str(f)) if f.stat().st_size
                 else empty.add(f.stem.split(".")[0]))
        if "train" not in files:
            raise UserError(f"{path}: no non-empty train.jsonl / train.parquet / train.csv in this directory")
        data = _load_files(files)
        for name in empty - set(files):
            data[name] = data["train"].select([])
    elif path.is_file():
        if path.suffix not in _FILE_TYPES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
        data = _load_files({"train": [str(path)]})
    elif path.is_absolute() or spec.startswith("."):
        raise UserError(f"dataset not found: {spec}")
    else:
        try:
            data = load_dataset(spec)
        except Exception as e:  # the hub client raises many types; the user needs one line
            raise UserError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0]}") from None
    if isinstance(data, Dataset):
        data = DatasetDict(train=data)
    if "train" not in data:
        raise UserError(f"{spec}: the dataset has no train split (splits: {', '.join(data)})")
    missing = [c for c in PREFERENCE_COLUMNS if c not in data["train"].column_names]
    if missing:
        raise UserError(f"{spec}: missing column(s) {', '.join(missing)}; expected prompt, chosen, rejected")
    try:
        data = DatasetDict({name: split.map(to_conversational) for name, split in data.items()})
    except (KeyError, TypeError, ValueError) as e:  # a message without role or content
        raise UserError(f"{spec}: a prompt, chosen or rejected value is not text or {{role, content}} messages "
                        f"({type(e).__name__}: {e})") from None
    if "test" not in data and "validation" in data:
        data["test"] = data.pop("validation")
    if "test" not in data:
        data = _split_by_prompt(data["train"], test_size, seed)
    return data


def _split_by_prompt(train, test_size: float, seed: int):
    """Hold out a share of distinct prompts (not rows), so no prompt sits on both sides of the split."""
    import random

    from datasets import DatasetDict

    keys = [str(p) for p in train["prompt"]]
    distinct = sorted(set(keys))
    random.Random(seed).shuffle(distinct)
    n_test = max(1, round(len(distinct) * test_size)) if len(distinct) > 1 else 0
    held_out = set(distinct[:n_test])
    test_idx = [i for i, k in enumerate(keys) if k in held_out]
    train_idx = [i for i, k in enumerate(keys) if k not in held_out]
    return DatasetDict(train=train.select(train_idx), test=train.select(test_idx))


# ---------------------------------------------------------------- reading files, with file:line errors


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from .jsonl/.json/.csv/.parquet; a malformed line is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return _parse_rows(path)
    except UnicodeDecodeError as e:
        # The line of the bad byte, counted in the raw bytes: what an editor shows the user.
        lineno = path.read_bytes()[: e.start].count(b"\n") + 1 if path.suffix != ".parquet" else 0
        raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8"
                        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            rows.append((lineno, row))
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        return list(enumerate(data, 1))
    if path.suffix == ".csv":
        # Decoded whole, so a bad byte's offset is the file's (see _read_rows).
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        try:
            # The line a row ends on (a quoted field may span lines).
            return [(reader.line_num, dict(row)) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(path))
        except Exception as e:  # pyarrow raises several types for a damaged file; the user needs one line
            raise UserError(f"{path}: not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None
        return list(enumerate(table.to_pylist(), 1))
    raise UserError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: {name} must be text, not {type(value).__name__}")
    return value or ""


def read_prompt_rows(path: Path, default_split: str = "train") -> list[dict]:
    """Prompt rows {prompt (messages), source, split} from a file with a `prompt` (text) or `messages` column."""
    rows, seen = [], {}
    for lineno, row in _read_rows(path):
        value = row.get("messages") or row.get("prompt")
        if value is None:
            raise UserError(f"{path}:{lineno}: no 'prompt' or 'messages' column")
        try:
            messages = _as_messages(value, "user")
        except (KeyError, TypeError):
            raise UserError(f"{path}:{lineno}: messages must be a list of {{role, content}}") from None
        if not all(isinstance(m["content"], str) and m["content"].strip() for m in messages):
            raise UserError(f"{path}:{lineno}: empty prompt text")
        if not all(m["role"] in ("system", "user", "assistant") for m in messages):
            raise UserError(f"{path}:{lineno}: roles must be system, user or assistant")
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            raise UserError(f"{path}:{lineno}: duplicate of line {seen[key]}")
        seen[key] = lineno
        split = _text_field(row, "split", f"{path}:{lineno}") or default_split
        if len(split) > 32:
            raise UserError(f"{path}:{lineno}: a split name is at most 32 characters")
        rows.append({"prompt": messages, "source": _text_field(row, "source", f"{path}:{lineno}") or path.name,
                     "split": split})
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def read_prompts(spec: str, split: str = "", limit: int = 0) -> list:
    """Prompts (text, or chat messages) from the shipped set `sentiment`, a .txt file (one per line), or a
    .jsonl/.json/.csv/.parquet file; rows of other splits are dropped when `split` is given and rows have one."""
    path = SHIPPED_PROMPTS.get(spec, Path(spec))
    if not path.is_file():
        raise UserError(f"prompts not found: {spec} (use 'sentiment' or a .jsonl/.csv/.txt file)")
    if path.suffix == ".txt":
        rows = [{"prompt": [{"role": "user", "content": line.strip()}], "split": ""}
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = read_prompt_rows(path, default_split="")
    prompts = [r["prompt"] for r in rows if not split or r["split"] in ("", split)]
    # One user turn stays plain text: that is what the gold functions and the reports show.
    prompts = [p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p for p in prompts]
    if not prompts:
        raise UserError(f"{path}: no prompts" + (f" in split {split!r}" if split else ""))
    return prompts[:limit] if limit else prompts


# A turn's marker; HH-RLHF as published also ends some transcripts with a bare "Assistant:" (an empty reply).
_HH_TURN = re.compile(r"\n\n(Human|Assistant):(?: |$)")


def parse_hh(transcript: str) -> list[dict]:
    """Anthropic HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (it must start with '\\n\\nHuman: ')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts) - 1, 2)]


def hh_to_preference(chosen: str, rejected: str) -> dict:
    """An HH pair as a conversational preference row: the shared turns are the prompt, the last replies differ."""
    chosen_msgs, rejected_msgs = parse_hh(chosen), parse_hh(rejected)
    if chosen_msgs[:-1] != rejected_msgs[:-1]:
        raise ValueError("chosen and rejected do not share the same conversation before the last reply")
    if chosen_msgs[-1]["role"] != "assistant" or rejected_msgs[-1]["role"] != "assistant":
        raise ValueError("the last turn of chosen and rejected must be the Assistant's")
    return {"prompt": chosen_msgs[:-1], "chosen": [chosen_msgs[-1]], "rejected": [rejected_msgs[-1]]}


def _preference(row: dict) -> dict:
    """One file row as a checked conversational preference row, or a ValueError saying what is wrong with it."""
    if "prompt" not in row and {"chosen", "rejected"} <= set(row) and isinstance(row["chosen"], str):
        pref = hh_to_preference(row["chosen"], row["rejected"])
    elif {"prompt", "chosen", "rejected"} <= set(row):
        pref = to_conversational(row)
    else:
        raise ValueError("needs prompt/chosen/rejected (TRL) or chosen/rejected transcripts (HH-RLHF)")
    for side in ("chosen", "rejected"):
        if not pref[side] or not isinstance(pref[side][-1]["content"], str) or not pref[side][-1]["content"].strip():
            raise ValueError(f"empty {side} response")
    if not pref["prompt"] or not all(isinstance(m["content"], str) and m["content"].strip() for m in pref["prompt"]):
        raise ValueError("an empty prompt, or an empty turn in it")
    if any(m["role"] not in ("system", "user", "assistant") for side in PREFERENCE_COLUMNS for m in pref[side]):
        raise ValueError("roles must be system, user or assistant")
    if pref["chosen"][-1]["content"] == pref["rejected"][-1]["content"]:
        raise ValueError("chosen and rejected are the same response")
    margin = row.get("margin")
    if margin is not None and margin != "":
        try:
            pref["margin"] = float(margin)
        except (TypeError, ValueError):
            pref["margin"] = math.nan
        if isinstance(margin, bool) or not math.isfinite(pref["margin"]):
            raise ValueError(f"margin must be a finite number, not {margin!r}")
    return pref


def read_preference_rows(path: Path, on_bad_row: str = "fail") -> tuple[list[tuple[int, dict]], list[str]]:
    """(line, preference row) pairs from TRL's format (text or conversational, optional margin) or HH-RLHF's
    transcripts, and the rows left out ("file:line: why"). A bad row (an empty reply, histories that differ before
    the last reply, chosen = rejected, a bad margin) is refused with its line (`on_bad_row="fail"`) or left out
    ("skip"); a duplicate line is always refused, and so is a file without one good row."""
    out, seen, bad = [], {}, []
    for lineno, row in _read_rows(path):
        try:
            pref = _preference(row)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if on_bad_row == "fail":
                raise UserError(f"{path}:{lineno}: {why}") from None
            bad.append(f"{path}:{lineno}: {why}")
            continue
        key = json.dumps([pref["prompt"], pref["chosen"], pref["rejected"]], sort_keys=True)
        if key in seen:
            raise UserError(f"{path}:{lineno}: duplicate of line {seen[key]}")
        seen[key] = lineno
        out.append((lineno, pref))
    if not out:
        raise UserError(f"{path}: no preference rows" + (f" (the first bad one: {bad[0]})" if bad else ""))
    return out, bad


def _rating(row: dict) -> dict:
    """One rated response (KTO's unpaired format: prompt, completion, and a label and/or a Likert score) as a
    conversational prompt, the response's text, its thumb and score; ValueError says what is wrong."""
    if "prompt" not in row or "completion" not in row:
        raise ValueError("needs prompt and completion, with label (true/false) or likert (1-5)")
    prompt = _as_messages(row["prompt"], "user")
    completion = _as_messages(row["completion"], "assistant")
    text = completion[-1]["content"] if completion else ""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty completion")
    if not prompt or not all(isinstance(m["content"], str) and m["content"].strip() for m in prompt):
        raise ValueError("an empty prompt, or an empty turn in it")
    label, likert = row.get("label"), row.get("likert")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if label is not None and not isinstance(label, bool):
        raise ValueError(f"label must be true or false, not {label!r}")
    if likert is not None and likert != "":
        if isinstance(likert, str) and likert.strip().isdigit():
            likert = int(likert)
        if isinstance(likert, bool) or not isinstance(likert, int) or not 1 <= likert <= 5:
            raise ValueError(f"likert must be a whole number from 1 to 5, not {likert!r}")
    else:
        likert = None
    thumb = ("up" if label else "down") if label is not None else likert_thumb(likert) if likert is not None else None
    if thumb is None:
        raise ValueError("no label, and no Likert score but 3 (neither good nor bad: not a KTO label)" if likert
                         else "needs label (true/false) or likert (1-5)")
    return {"prompt": prompt, "text": text, "choice": thumb, "likert": likert}


def read_rating_rows(path: Path, on_bad_row: str = "fail") -> tuple[list[tuple[int, dict]], list[str]]:
    """(line, rating) pairs from a file of rated responses (`_rating`), and the rows left out ("file:line: why"),
    with the same rules as `read_preference_rows`: a bad row refused or left out, a duplicate always refused."""
    out, seen, bad = [], {}, []
    for lineno, row in _read_rows(path):
        try:
            rating = _rating(row)
        except (ValueError, KeyError, TypeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if on_bad_row == "fail":
                raise UserError(f"{path}:{lineno}: {why}") from None
            bad.append(f"{path}:{lineno}: {why}")
            continue
        key = json.dumps([rating["prompt"], rating["text"]], sort_keys=True)
        if key in seen:
            raise UserError(f"{path}:{lineno}: duplicate of line {seen[key]}")
        seen[key] = lineno
        out.append((lineno, rating))
    if not out:
        raise UserError(f"{path}: no rating rows" + (f" (the first bad one: {bad[0]})" if bad else ""))
    return out, bad


# ---------------------------------------------------------------- export


def strength_to_margin(strength: int, mapping: tuple[float, float, float]) -> float:
    return mapping[strength - 1]


def vote_margin(vote: dict, mapping: tuple[float, float, float]) -> float:
    """A vote's margin: the explicit one it was imported with, else its strength's mapped margin."""
    explicit = vote.get("margin")
    return float(explicit) if explicit is not None else strength_to_margin(vote["strength"], mapping)


def aggregate_task(task: dict, method: str, margins: tuple[float, float, float]) -> dict | None:
    """One task's votes as a preference (winner, margin, agreement) or a non-preference label; None if unvoted.

    majority: the plurality of {A, B, tie, both_bad}; A or B alone on top is a preference, anything else
    (a tie, both bad, or an A/B draw) goes to the ties split. margin = mean mapped strength of the winning votes.
    mean: the mean of +margin(strength) for A, -margin for B, 0 for tie/both bad; its sign picks the winner.
    """
    votes = task["votes"]
    if not votes:
        return None
    counts = Counter(v["choice"] for v in votes)
    if method == "majority":
        top = max(counts.values())
        leaders = [c for c, n in counts.items() if n == top]
        if len(leaders) == 1 and leaders[0] in ("A", "B"):
            winner = leaders[0]
            won = [v for v in votes if v["choice"] == winner]
            margin = sum(vote_margin(v, margins) for v in won) / len(won)
            return {"winner": winner, "margin": margin, "agreement": len(won) / len(votes)}
        label = leaders[0] if len(leaders) == 1 else "split"
        return {"winner": None, "label": label, "agreement": top / len(votes)}
    if method == "mean":
        sign = {"A": 1.0, "B": -1.0}
        score = sum(sign.get(v["choice"], 0.0) * vote_margin(v, margins) for v in votes) / len(votes)
        if score == 0:
            return {"winner": None, "label": "tie" if counts["tie"] >= counts["both_bad"] else "both_bad",
                    "agreement": 1.0}
        winner = "A" if score > 0 else "B"
        return {"winner": winner, "margin": abs(score), "agreement": counts[winner] / len(votes)}
    raise UserError(f"aggregate must be majority or mean, not {method!r}")


def _prompt_in_test(messages: list[dict], test_size: float, seed: int) -> bool:
    """A prompt's split is a function of the prompt alone, so it never changes between exports or rounds."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(messages, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_size


def ranking_pairs(ranking: list[list[int]] | None, k: int) -> list[tuple[int, int, float]]:
    """A ranking of k positions (groups of tied positions, best first; None: all bad) as its C(k, 2) pairs
    (better, worse, margin), margin = rank distance / (number of groups - 1), so first vs last is 1; a tied pair
    has margin 0 (in position order), as has every pair of an all-bad ranking."""
    if ranking is None:
        return [(i, j, 0.0) for i in range(k) for j in range(i + 1, k)]
    rank = {p: g for g, group in enumerate(ranking) for p in group}
    span = max(len(ranking) - 1, 1)
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            better, worse = (i, j) if rank[i] <= rank[j] else (j, i)
            pairs.append((better, worse, abs(rank[i] - rank[j]) / span))
    return pairs


def _ranking_rows(task: dict) -> list[tuple[dict, str]]:
    """Each ranking vote of a task expanded into its pairs, as (row, label): label "preference", "tie" or "both_bad".
    Pairs of one ranking share a `group` (InstructGPT kept a ranking's pairs in one batch, to not overfit them)."""
    from rlhf.store.writes import valid_ranking

    out = []
    responses = task["responses"]
    for v in task["votes"]:
        # Only a ranking of every response, or "all bad", becomes pairs: a store written before the store checked
        # votes against their task's kind may hold an A/B choice or a partial ranking here.
        if not (v["choice"] == "both_bad" or (v["choice"] == "ranked" and valid_ranking(v.get("ranking"),
                                                                                         len(responses)))):
            continue
        group = f"ranking-{task['task_id']}-{v['annotator']}"
        for better, worse, margin in ranking_pairs(v.get("ranking"), len(responses)):
            label = "both_bad" if v.get("ranking") is None else "preference" if margin > 0 else "tie"
            chosen, rejected = responses[better], responses[worse]
            out.append(({"prompt": task["prompt"], "chosen": [{"role": "assistant", "content": chosen["text"]}],
                         "rejected": [{"role": "assistant", "content": rejected["text"]}], "margin": float(margin),
                         "label": label, "chosen_model": chosen["model"], "rejected_model": rejected["model"],
                         "task_id": task["task_id"], "round": task["round"], "how": task["how"], "n_votes": 1,
                         "agreement": 1.0, "group": group}, label))
    return out


def likert_thumb(likert: int) -> str | None:
    """A Likert score (1-5) as a thumb, for ratings that came with a score only: 4-5 up, 1-2 down, 3 neither (KTO
    has no neutral label, so a 3 is not training data)."""
    return "up" if likert >= 4 else "down" if likert <= 2 else None


def rating_row(task: dict) -> dict | None:
    """A rate task's votes as one KTO row: label = the majority thumb (True = up, desirable); likert = the mean of
    the scores given (None without one). None when unvoted or the thumbs split evenly."""
    thumbs = Counter(v["choice"] for v in task["votes"] if v["choice"] in ("up", "down"))
    if not thumbs or thumbs["up"] == thumbs["down"]:
        return None
    label = thumbs["up"] > thumbs["down"]
    scores = [v["likert"] for v in task["votes"] if v.get("likert") is not None]
    [response] = task["responses"]
    return {"prompt": task["prompt"], "completion": [{"role": "assistant", "content": response["text"]}],
            "label": label, "likert": sum(scores) / len(scores) if scores else None, "model": response["model"],
            "task_id": task["task_id"], "round": task["round"], "n_votes": sum(thumbs.values()),
            "agreement": max(thumbs.values()) / sum(thumbs.values()), "group": f"task-{task['task_id']}"}


def edit_rows(task: dict) -> tuple[list[dict], list[dict]]:
    """A task's edits as SFT demonstrations (the prompt's messages and the edited answer) and as preference pairs
    edited > original, for a pair edited > both originals (column edit = True, margin 0: a plain Bradley-Terry
    pair; one group per edit)."""
    demos, pairs = [], []
    for e in task.get("edits", []):
        source = task["responses"][e["position"]]
        edited = [{"role": "assistant", "content": e["text"]}]
        demos.append({"messages": task["prompt"] + edited, "original": source["text"], "annotator": e["annotator"],
                      "task_id": task["task_id"], "round": task["round"]})
        beaten = task["responses"] if task.get("kind") == "pair" else [source]
        for other in beaten:
            pairs.append({"prompt": task["prompt"], "chosen": edited,
                          "rejected": [{"role": "assistant", "content": other["text"]}], "margin": 0.0,
                          "label": "preference", "chosen_model": f"edit:{e['annotator']}",
                          "rejected_model": other["model"], "task_id": task["task_id"], "round": task["round"],
                          "how": "edit", "n_votes": 1, "agreement": 1.0,
                          "group": f"edit-{task['task_id']}-{e['position']}-{e['annotator']}", "edit": True})
    return demos, pairs


def export_preferences(tasks: list[dict], method: str = "majority", margins=(0.0, 0.5, 1.0), test_size: float = 0.1,
                       seed: int = 0, edit_pairs: bool = True):
    """Store tasks (`Store.tasks()`) as a DatasetDict(train, test, ties, ratings_train, ratings_test, edits) in
    TRL's conversational formats.

    Pairs aggregate their votes into one row; each ranking of K responses becomes its C(K, 2) pairs (one `group`
    per ranking); a rating task's votes one unpaired row (`rating_row`); every edit an SFT demonstration and, with
    `edit_pairs`, pairs edited > original (`edit_rows`). Swapped repeats (the bias audit) and votes an admin
    rejected on review are left out. A prompt's rows all go to the same side of the split.
    """
    from datasets import Dataset, DatasetDict

    splits: dict[str, list[dict]] = {name: [] for name in EXPORT_SPLITS}
    for task in tasks:
        if task["how"] == "repeat":
            continue  # the same annotator's second look at a pair: an audit, not more data
        task = {**task, "votes": [v for v in task["votes"] if v.get("review") != "rejected"]}
        held_out = _prompt_in_test(task["prompt"], test_size, seed)
        demos, pairs = edit_rows(task)
        splits["edits"] += demos
        if edit_pairs:
            splits["test" if held_out else "train"] += pairs
        if task.get("kind") == "rate":
            row = rating_row(task)
            if row is not None:
                splits["ratings_test" if held_out else "ratings_train"].append(row)
            continue
        if task.get("kind") == "rank":
            for row, label in _ranking_rows(task):
                splits["ties" if label != "preference" else "test" if held_out else "train"].append(row)
            continue
        if len(task["responses"]) != 2:
            continue
        agg = aggregate_task(task, method, tuple(margins))
        if agg is None:
            continue
        a, b = task["responses"]
        meta = {"task_id": task["task_id"], "round": task["round"], "how": task["how"], "n_votes": len(task["votes"]),
                "agreement": agg["agreement"], "group": f"task-{task['task_id']}"}
        if agg["winner"] is None:
            splits["ties"].append({"prompt": task["prompt"], "chosen": [{"role": "assistant", "content": a["text"]}],
                                   "rejected": [{"role": "assistant", "content": b["text"]}], "margin": 0.0,
                                   "label": agg["label"], "chosen_model": a["model"], "rejected_model": b["model"],
                                   **meta})
            continue
        chosen, rejected = (a, b) if agg["winner"] == "A" else (b, a)
        row = {"prompt": task["prompt"], "chosen": [{"role": "assistant", "content": chosen["text"]}],
               "rejected": [{"role": "assistant", "content": rejected["text"]}], "margin": float(agg["margin"]),
               "label": "preference", "chosen_model": chosen["model"], "rejected_model": rejected["model"], **meta}
        splits["test" if held_out else "train"].append(row)
    for name in ("train", "test", "ties"):
        splits[name] = [{**row, "edit": row.get("edit", False)} for row in splits[name]]
    return DatasetDict({name: Dataset.from_list(rows) if rows else
                        Dataset.from_dict({c: [] for c in EXPORT_SPLITS[name]}) for name, rows in splits.items()})


_PAIR_COLUMNS = ["prompt", "chosen", "rejected", "margin", "label", "chosen_model", "rejected_model", "task_id",
                 "round", "how", "n_votes", "agreement", "group", "edit"]
_RATING_COLUMNS = ["prompt", "completion", "label", "likert", "model", "task_id", "round", "n_votes", "agreement",
                   "group"]
# The export's splits and their columns (an empty split is written with them).
EXPORT_SPLITS = {"train": _PAIR_COLUMNS, "test": _PAIR_COLUMNS, "ties": _PAIR_COLUMNS,
                 "ratings_train": _RATING_COLUMNS, "ratings_test": _RATING_COLUMNS,
                 "edits": ["messages", "original", "annotator", "task_id", "round"]}


# ---------------------------------------------------------------- CLI: rlhf data import | export | stats


@dataclass
class ImportConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    file: str = field("", "File to import: .jsonl, .json, .csv or .parquet.")
    kind: str = field("auto", "prompts, preferences (TRL or HH-RLHF), ratings (rated responses: prompt, completion, "
                              "label and/or likert), tasks (a lossless dump), or auto.")
    source: str = field("", "Source name stored with imported prompts (default: the file name).")
    round: int = field(0, "Round number given to imported preference and rating tasks.")
    on_bad_row: str = field("skip", "Preferences and ratings: skip a bad row (an empty reply, histories that differ, "
                            "...) and list it, or fail: refuse the whole file at its first bad row.")

    def __post_init__(self):
        if self.kind not in ("auto", "prompts", "preferences", "ratings", "tasks"):
            raise ValueError("kind must be auto, prompts, preferences, ratings or tasks")
        if self.on_bad_row not in ("skip", "fail"):
            raise ValueError("on_bad_row must be skip or fail")


@dataclass
class ExportConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    out: str = field("runs/export", "Output directory: train/test/ties files, tasks.jsonl (lossless), export.json.")
    format: str = field("jsonl", "jsonl or parquet.")
    aggregate: str = field("majority", "How votes of several annotators combine: majority or mean.")
    margins: list[float] = field([0.0, 0.5, 1.0], "Margin for strength 1 (slight), 2 (clear), 3 (strong).")
    test_size: float = field(0.1, "Share of prompts held out as the test split (by prompt, stable across exports).")
    seed: int = field(0, "Seed of the prompt split.")
    round: int = field(-1, "Export only this round (-1: all rounds).")
    edit_pairs: bool = field(True, "Also write each annotator's edit as pairs edited > original (column edit = "
                                   "true) beside its SFT demonstration (edits).")

    def __post_init__(self):
        if self.format not in ("jsonl", "parquet") or self.aggregate not in ("majority", "mean"):
            raise ValueError("format must be jsonl or parquet; aggregate majority or mean")
        if len(self.margins) != 3 or not 0 <= self.test_size < 1:
            raise ValueError("margins needs three values; test_size must be in [0, 1)")


@dataclass
class StatsConfig:
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    round: int = field(-1, "Only this round (-1: all rounds).")
    json: bool = field(False, "Print the figures as JSON instead of a table.")


def _store(db: str):
    from rlhf.store import Store

    return Store(db or None)


def run_import(config: ImportConfig) -> dict:
    """Import a file; every row is checked before the one transaction that writes them, so a refused file leaves
    the store as it was. Rows the store already holds (the file imported before) are skipped and counted."""
    from rlhf.store import import_tasks, masked_url

    path = Path(config.file)
    if not config.file:
        raise UserError("name the file to import: --file PATH")
    rows = _read_rows(path)
    kind = config.kind
    if kind == "auto":
        first = rows[0][1] if rows else {}
        kind = ("tasks" if "responses" in first or "record" in first else "preferences" if "chosen" in first
                else "ratings" if "completion" in first else "prompts")
    source = config.source or path.name
    bad: list[str] = []
    if kind == "prompts":
        prompt_rows = read_prompt_rows(path)
        store = _store(config.db)
        before = store.counts()["prompts"]
        # One call, one transaction: an interrupted import of many splits leaves none of them half-stored.
        store.add_prompts([r["prompt"] for r in prompt_rows], source=source, split=[r["split"] for r in prompt_rows])
        added = store.counts()["prompts"] - before
        result = {"prompts": added, **({"skipped": len(prompt_rows) - added} if added < len(prompt_rows) else {})}
    elif kind == "preferences":
        margins = (0.0, 0.5, 1.0)
        tasks, where = [], []
        prefs, bad = read_preference_rows(path, config.on_bad_row)
        for lineno, pref in prefs:
            where.append(f"{path}:{lineno}")
            # The vote keeps the row's margin as given (none given: no margin, not the "clear" strength's 0.5, which
            # would change the loss to -log sigmoid(r_c - r_r - 0.5)); its strength is the nearest default's, for
            # display.
            margin = pref.get("margin", 0.0)
            strength = min((1, 2, 3), key=lambda s: abs(margins[s - 1] - margin))
            tasks.append({"prompt": pref["prompt"], "prompt_source": source, "round": config.round, "how": "import",
                          "responses": [{"text": pref["chosen"][-1]["content"], "model": f"import:{source}"},
                                        {"text": pref["rejected"][-1]["content"], "model": f"import:{source}"}],
                          "votes": [{"annotator": f"import:{source}", "choice": "A", "strength": strength,
                                     "margin": margin, "simulated": True}]})
        store = _store(config.db)
        result = import_tasks(store, tasks, source=source, where=where)
    elif kind == "ratings":
        ratings, bad = read_rating_rows(path, config.on_bad_row)
        tasks = [{"prompt": r["prompt"], "prompt_source": source, "round": config.round, "how": "import",
                  "kind": "rate", "responses": [{"text": r["text"], "model": f"import:{source}"}],
                  "votes": [{"annotator": f"import:{source}", "choice": r["choice"], "likert": r["likert"],
                             "simulated": True}]} for _, r in ratings]
        store = _store(config.db)
        result = import_tasks(store, tasks, source=source, where=[f"{path}:{lineno}" for lineno, _ in ratings])
    else:
        store = _store(config.db)
        result = import_tasks(store, [row for _, row in rows], source=source,
                              where=[f"{path}:{lineno}" for lineno, _ in rows])
    if bad:
        result["bad_rows"] = len(bad)
    added = ", ".join(f"{v} {k}" for k, v in result.items() if k not in ("skipped", "bad_rows")) or "nothing new"
    skipped = f"; skipped {result['skipped']} already in the store" if result.get("skipped") else ""
    left_out = f"; left out {len(bad)} bad rows (listed below)" if bad else ""
    print(f"imported {added} from {path} into {masked_url(store.url)}{skipped}{left_out}")
    for line in bad[:_BAD_ROWS_SHOWN]:
        print(f"  left out {line}")
    if len(bad) > _BAD_ROWS_SHOWN:
        print(f"  ... and {len(bad) - _BAD_ROWS_SHOWN} more")
    return result


_BAD_ROWS_SHOWN = 50  # a summary, not a flood: the first bad rows with their lines, then how many more


def run_export(config: ExportConfig) -> dict:
    from rlhf.store import LABELED

    store = _store(config.db)
    round_ = None if config.round < 0 else config.round
    tasks = store.tasks(round=round_, kind=LABELED)
    data = export_preferences(tasks, config.aggregate, tuple(config.margins), config.test_size, config.seed,
                              config.edit_pairs)
    out = Path(config.out)
    try:
        summary = _write_export(out, data, tasks, config)
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename else "")) from None
    extra = (f", {summary['ratings_train']} + {summary['ratings_test']} ratings (train + test)"
             if summary["ratings_train"] + summary["ratings_test"] else "")
    extra += f", {summary['edits']} edits" if summary["edits"] else ""
    print(f"exported {summary['train']} train, {summary['test']} test, {summary['ties']} ties/both-bad pairs{extra} "
          f"from {len(tasks)} tasks to {out}")
    return summary


def _write_export(out: Path, data, tasks: list[dict], config: ExportConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for name, split in data.items():
        # Written beside and renamed into place: an interrupted export never leaves a half-written split.
        target = out / f"{name}.{config.format}"
        tmp = out / f".{name}.{config.format}.tmp"
        if config.format == "jsonl":
            split.to_json(str(tmp), lines=True, force_ascii=False)
        else:
            split.to_parquet(str(tmp))
        tmp.replace(target)
    with (out / ".tasks.jsonl.tmp").open("w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task, ensure_ascii=False) + "\n")
    (out / ".tasks.jsonl.tmp").replace(out / "tasks.jsonl")
    summary = {name: len(split) for name, split in data.items()}
    # The config as written holds the database URL: its password masked.
    settings = {**vars(config), "db": _masked(config.db)}
    (out / "export.json").write_text(json.dumps({"counts": summary, "config": settings}, indent=2) + "\n")
    return summary


def _masked(db: str) -> str:
    from rlhf.store import masked_url

    return masked_url(db) if db else db


def run_stats(config: StatsConfig) -> dict:
    from rlhf.store import LABELED

    store = _store(config.db)
    round_ = None if config.round < 0 else config.round
    stats = quality_stats(store.tasks(round=round_, kind=LABELED))
    print(json.dumps(stats, indent=2) if config.json else format_stats(stats))
    return stats
