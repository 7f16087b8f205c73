"""Preference data in and out: TRL's preference format, Anthropic HH-RLHF text, JSONL/CSV/Parquet.

Every trainer (reward, DPO, PPO prompts) reads preferences through `load_preference_dataset`, whatever their
source: a store export directory, a single file, a `save_to_disk` directory, or a Hub dataset id.

The format is TRL's conversational preference format:
    prompt   list of {"role", "content"} messages, ending with the user turn
    chosen   [{"role": "assistant", "content": ...}]
    rejected [{"role": "assistant", "content": ...}]
    margin   optional float, how strongly chosen beats rejected (from the vote's strength)
Plain-text rows (prompt/chosen/rejected as strings) are accepted and converted. Other columns (ids, round,
group) ride along; trainers keep only the columns they use.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.config import UserError

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
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
    return load_dataset(kinds.pop(), data_files=files)


def load_preference_dataset(spec: str, test_size: float = 0.1, seed: int = 0):
    """Load preferences as a DatasetDict with at least `train` (and `test`, split off by prompt if absent).

    spec: a directory of `<split>.{jsonl,parquet,csv}` files (what `rlhf data export` writes), a single such file,
    a `datasets.save_to_disk` directory, or a Hub dataset id (where a hub is reachable).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        data = load_from_disk(str(path))
    elif path.is_dir():
        files: dict[str, list[str]] = {}
        for f in sorted(path.iterdir()):
            if f.suffix in _FILE_TYPES and f.stem.split(".")[0] in ("train", "test", "validation"):
                files.setdefault(f.stem.split(".")[0], []).append(str(f))
        if "train" not in files:
            raise UserError(f"{path}: no train.jsonl / train.parquet / train.csv in this directory")
        data = _load_files(files)
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
    data = DatasetDict({name: split.map(to_conversational) for name, split in data.items()})
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
