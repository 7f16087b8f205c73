"""Shared fixtures: tiny random models and a tiny tokenizer built in-process, so no test touches a network.

`tiny_model_dir` is a 2-layer Llama (hidden 32) saved as safetensors with a byte-level BPE tokenizer that has a
ChatML chat template like SmolLM2's; `tiny_reward_dir` is a sequence-classification model (one score) on the
same tokenizer. Stages load both by path, exactly as they load real models.
"""

from __future__ import annotations

import os

# Set before transformers is imported anywhere: the suite must never reach for a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough varied English for byte-level BPE to learn useful merges; any text still encodes (byte fallback).
_CORPUS = [
    "Write a short review of the film Alien.",
    "The film was wonderful, moving and funny; I loved every minute of it.",
    "A dull, boring and terrible movie. I hated it and want my money back.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis to a child in two sentences.",
    "Plants use sunlight, water and air to make their own food.",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then knead and bake.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_=+*/&%$#@",
] * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # A wider init than the default 0.02 keeps a random model's logits from being near-ties everywhere.
        initializer_range=0.2,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def build_tiny_causal_lm(tokenizer, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_llama_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_reward_model(tokenizer, seed: int = 1):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_tiny_llama_config(tokenizer, num_labels=1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A saved tiny random causal LM (safetensors + tokenizer + chat template); treat it as read-only."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_causal_lm(tiny_tokenizer).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A saved tiny random sequence-classification model (one score) on the tiny tokenizer; read-only."""
    path = tmp_path_factory.mktemp("tiny-reward")
    build_tiny_reward_model(tiny_tokenizer).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _isolated_rlhf_home(tmp_path, monkeypatch, request):
    """Every test gets its own $RLHF_HOME, so no test reads or writes the user's cache or default store."""
    if "default_model_home" not in request.fixturenames:
        monkeypatch.setenv("RLHF_HOME", str(tmp_path / "rlhf-home"))


@pytest.fixture(scope="session")
def default_model_home(tmp_path_factory) -> Path:
    """An $RLHF_HOME holding the converted embedded default (one ~30 s conversion per session; needs the wheel)."""
    home = tmp_path_factory.mktemp("rlhf-home-default")
    old = os.environ.get("RLHF_HOME")
    os.environ["RLHF_HOME"] = str(home)
    try:
        from rlhf.models import pull_default

        pull_default(quiet=True)
    finally:
        if old is None:
            os.environ.pop("RLHF_HOME", None)
        else:
            os.environ["RLHF_HOME"] = old
    return home


CHROMIUM = os.environ.get("RLHF_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, driven by Playwright (`playwright install` cannot download browsers here).

    Skipped where Chromium is absent, except under CI=true, where its absence is a failure.
    """
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs Chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        yield browser
        browser.close()


@pytest.fixture
def artifacts_dir() -> Path:
    """Where browser tests leave screenshots for people to look at (gitignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def _postgres_url() -> str:
    url = os.environ.get("RLHF_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide RLHF_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """A fresh, empty store URL: SQLite in tmp_path, and a new PostgreSQL database (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import uuid

    from sqlalchemy import create_engine, text

    base = _postgres_url()
    name = f"rlhf_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE "{name}"'))
    admin.dispose()
