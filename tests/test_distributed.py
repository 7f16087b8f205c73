"""Two processes agree with one: every stage (sft, reward, dpo, ppo) under `accelerate launch` with 2 CPU processes
(gloo) trains on the same global batch and gives the result of a 1-process run, under each launch config that spreads
a run over processes: plain data parallel (ddp.yaml), FSDP2 (fsdp2.yaml), DeepSpeed ZeRO-2 and ZeRO-3. The sharded
ones must also gather their shards into one full model directory that loads in a fresh process and computes what the
1-process model does. And the README's multi-GPU commands name real accelerate configs, stages and stage configs.

The 2-process runs pass `--num_processes 2`: on a machine without GPUs accelerate starts them through
torch.distributed.run and, since the stages ask for the CPU, joins them with gloo; rlhf.distributed sets FSDP and
DeepSpeed up on CPU processes, which accelerate leaves to GPUs (configs/accelerate/cpu.yaml goes through accelerate's
single-process launcher, which starts one process whatever --num_processes says). Each process gets half the
per-device batch of the 1-process run, so the global batch is the same. Every run is fp32: `precision: auto` is bf16
on CPUs with AVX512-BF16, and bf16 noise would swamp the comparisons. This file doubles as the PPO worker script
(`accelerate launch tests/test_distributed.py ppo CONFIG_JSON RESULT_FILE`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = ROOT / "configs" / "accelerate"
WORDS = ["film", "plot", "actor", "scene", "story", "music", "camera", "script", "light", "night", "day", "city"]
TRAIN_PAIRS = 48  # 6 optimizer steps at a global batch of 8


def _pairs(n: int, seed: int) -> list[dict]:
    """Short reviews; the chosen one carries 'wonderful' where the rejected one has 'dull'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 8))]
        k = rng.randrange(len(words) + 1)
        rows.append({"prompt": f"Review film {seed}-{i}", "chosen": " ".join(words[:k] + ["wonderful"] + words[k:]),
                     "rejected": " ".join(words[:k] + ["dull"] + words[k:])})
    return rows


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pairs")
    for split, n, seed in (("train", TRAIN_PAIRS, 0), ("test", 16, 1)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed)))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(accelerate_config: str, *args: str, processes: int = 1, timeout: int = 600) -> None:
    """`accelerate launch --config_file configs/accelerate/<config> [--num_processes N] ARGS` from the repository
    root, as the README runs it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / accelerate_config)]
    if processes > 1:
        cmd += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
    # One BLAS thread per process: two processes on two cores, and the 1-process run computes the same way.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


# The launch configs that spread a run over 2 processes, and the layout each run's metrics.json must report (a config
# that silently fell back to plain data parallel would say MULTI_CPU).
LAUNCHERS = {
    "ddp.yaml": {"type": "MULTI_CPU", "processes": 2},
    "fsdp2.yaml": {"type": "FSDP", "processes": 2, "fsdp_version": 2},
    "deepspeed_zero2.yaml": {"type": "DEEPSPEED", "processes": 2, "zero_stage": 2},
    "deepspeed_zero3.yaml": {"type": "DEEPSPEED", "processes": 2, "zero_stage": 3},
}
SHARDED = ["fsdp2.yaml", "deepspeed_zero3.yaml"]  # no process holds the whole model: saving gathers it


def _launch_stage(stage: str, launcher: str, options: dict) -> None:
    """`rlhf <stage>` under `launcher`: cpu.yaml for one process, any other config with 2."""
    flags = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    _launch(launcher, "-m", "rlhf.cli", stage, "--config", f"configs/{stage}.yaml", *flags,
            processes=1 if launcher == "cpu.yaml" else 2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """run(stage, options) -> the output directory of that 1-process run, run once per module for every launcher's
    test to compare with."""
    done: dict[str, Path] = {}

    def run(stage: str, options: dict) -> Path:
        key = json.dumps([stage, options], sort_keys=True, default=str)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{stage}-one")
            _launch_stage(stage, "cpu.yaml", {**options, "output_dir": out})
            done[key] = out
        return done[key]

    return run


def _metrics(path) -> dict:
    return json.loads((Path(path) / "metrics.json").read_text())


def _same_model_directory(one: Path, two: Path, head: str) -> None:
    """`two` is a model directory like `one` (the same files, the same tensor names: no shards, no wrapper prefixes,
    tied weights stored once) and, loaded in this process, gives the same outputs on the same text."""
    from safetensors import safe_open

    from rlhf.models import load

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    with safe_open(str(one / "model.safetensors"), "pt") as a, safe_open(str(two / "model.safetensors"), "pt") as b:
        assert sorted(b.keys()) == sorted(a.keys())
    outputs = []
    for path in (one, two):
        loaded = load(str(path), head=head, device="cpu", precision="fp32", padding_side="right")
        batch = loaded.tokenizer(["Review film 0: the plot was wonderful", "dull"], return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs.append(loaded.model(**batch).logits)
    assert outputs[0].abs().max() > 0
    assert torch.allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4), (outputs[1] - outputs[0]).abs().max()


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _relative_gap(one: dict, two: dict, start: dict) -> float:
    """|w_1 - w_2| / |w_1 - w_0| over all tensors: how far apart the two runs end, per unit of distance trained."""
    gap = sum(float((one[k] - two[k]).double().norm() ** 2) for k in one) ** 0.5
    # A fresh head (the reward model's score) has no starting value: its distance from zero counts.
    moved = sum(float((one[k] - start[k] if k in start else one[k]).double().norm() ** 2) for k in one) ** 0.5
    assert moved > 0
    return gap / moved


# Tolerances. fp32 runs that see the same global batches differ only in the order of floating-point sums (two
# half-batch gradients averaged by all-reduce vs one batch; each process pads its half to its own length):
# measured here, 1e-6 of the distance trained apart in weights and 1e-6 relative in losses. The bounds below sit
# 1000x and 100x above that. A wrong global batch changes the number of optimizer steps (checked exactly) or the
# data of a step, which puts the weights a whole learning-rate-sized step apart (of the order of 1e-1 of the
# distance trained in 6 steps); the bf16 autocast that configs/accelerate/ddp.yaml used to force on the reward
# stage (rlhf/reward/ now keeps the stage's precision) left its weights 8e-2 apart.
WEIGHT_GAP = 1e-3
METRIC_REL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_reward_two_processes_agree_with_one(tmp_path, launcher, one_process, tiny_model_dir, preference_dir):
    common = dict(model=tiny_model_dir, data=preference_dir, device="cpu", precision="fp32", epochs=1,
                  learning_rate=3e-3, max_length=64, logging_steps=1, norm_samples=2)
    one_dir = one_process("reward", {**common, "batch_size": 8})
    _launch_stage("reward", launcher, {**common, "batch_size": 4, "output_dir": tmp_path / "two"})
    one, two = _metrics(one_dir), _metrics(tmp_path / "two")
    assert one["distributed"] == {"type": "NO", "processes": 1}
    assert two["distributed"] == LAUNCHERS[launcher]

    # The global batch: 8 pairs per optimizer step either way, so one epoch is 6 steps, and the tokens counted over
    # both processes are every training pair's, once.
    assert one["steps"] == two["steps"] == TRAIN_PAIRS // 8
    assert one["train_tokens"] == two["train_tokens"] > 0
    # The result: held-out figures (computed after training, by the saved model on each process), losses, weights.
    assert one["accuracy"] == two["accuracy"]
    for key in ("eval_loss", "mean_margin", "train_loss"):
        assert two[key] == pytest.approx(one[key], rel=METRIC_REL), key
    assert two["final"]["loss"] == pytest.approx(one["final"]["loss"], rel=METRIC_REL)
    gap = _relative_gap(_weights(one_dir), _weights(tmp_path / "two"), _weights(tiny_model_dir))
    assert gap < WEIGHT_GAP, gap
    if launcher in SHARDED:
        _same_model_directory(one_dir, tmp_path / "two", "score")


def _same_steps(one_dir: Path, two_dir: Path, launcher: str) -> tuple[dict, dict]:
    """A TRL stage's two runs took the same optimizer steps (8 examples per step either way: the global batch) on
    the same examples (the same loss at every step), the second laid out as `launcher` says; their metrics."""
    one, two = _metrics(one_dir), _metrics(two_dir)
    assert two["distributed"] == LAUNCHERS[launcher]
    assert one["steps"] == two["steps"] == TRAIN_PAIRS // 8
    train_one = [h["loss"] for h in one["log_history"] if "loss" in h]
    train_two = [h["loss"] for h in two["log_history"] if "loss" in h]
    assert len(train_one) == len(train_two) == TRAIN_PAIRS // 8
    assert train_two == pytest.approx(train_one, rel=METRIC_REL)
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_dpo_two_processes_agree_with_one(tmp_path, launcher, one_process, tiny_model_dir, preference_dir):
    common = dict(model=tiny_model_dir, data=preference_dir, device="cpu", precision="fp32", epochs=1,
                  learning_rate=5e-3, max_length=64, logging_steps=1)
    one_dir = one_process("dpo", {**common, "batch_size": 8})
    _launch_stage("dpo", launcher, {**common, "batch_size": 4, "output_dir": tmp_path / "two"})
    one, two = _same_steps(one_dir, tmp_path / "two", launcher)
    assert one["mixed_precision"] == two["mixed_precision"] == "fp32"
    for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], rel=METRIC_REL), key
    gap = _relative_gap(_weights(one_dir), _weights(tmp_path / "two"), _weights(tiny_model_dir))
    assert gap < WEIGHT_GAP, gap
    if launcher in SHARDED:
        _same_model_directory(one_dir, tmp_path / "two", "causal-lm")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", SHARDED)
def test_dpo_lora_sharded_saves_the_merged_model(tmp_path, launcher, one_process, tiny_model_dir, preference_dir):
    """A LoRA adapter cannot be merged into shards: the stage merges it into the gathered weights, and the tied
    lm_head stays tied (it came apart once, and the saved model lost its lm_head)."""
    common = dict(model=tiny_model_dir, data=preference_dir, device="cpu", precision="fp32", epochs=1,
                  learning_rate=5e-3, max_length=64, logging_steps=1, lora="true")
    one_dir = one_process("dpo", {**common, "batch_size": 8})
    _launch_stage("dpo", launcher, {**common, "batch_size": 4, "output_dir": tmp_path / "two"})
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["tie_word_embeddings"] is json.loads((Path(tiny_model_dir) / "config.json").read_text()).get(
        "tie_word_embeddings", True)
    gap = _relative_gap(_weights(one_dir), _weights(tmp_path / "two"), _weights(tiny_model_dir))
    assert gap < WEIGHT_GAP, gap
    _same_model_directory(one_dir, tmp_path / "two", "causal-lm")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sft_two_processes_agree_with_one(tmp_path, launcher, one_process, tiny_model_dir, preference_dir):
    demos = Path(preference_dir).parent / "demos"
    if not demos.exists():
        demos.mkdir()
        rows = _pairs(TRAIN_PAIRS, 2)
        (demos / "train.jsonl").write_text("".join(
            json.dumps({"instruction": r["prompt"], "response": r["chosen"]}) + "\n" for r in rows))
    common = dict(model=tiny_model_dir, data=demos, device="cpu", precision="fp32", epochs=1, learning_rate=5e-3,
                  max_length=64, logging_steps=1, test_size=0.0)
    one_dir = one_process("sft", {**common, "batch_size": 8})
    _launch_stage("sft", launcher, {**common, "batch_size": 4, "output_dir": tmp_path / "two"})
    _same_steps(one_dir, tmp_path / "two", launcher)
    gap = _relative_gap(_weights(one_dir), _weights(tmp_path / "two"), _weights(tiny_model_dir))
    assert gap < WEIGHT_GAP, gap
    if launcher in SHARDED:
        _same_model_directory(one_dir, tmp_path / "two", "causal-lm")


# ---------------------------------------------------------------- PPO


PLAIN_FORWARD = None  # rlhf.rollout.PolicyAndCritic.forward, kept by the worker before it patches the class


def sample_rows_alone(self, input_ids, attention_mask, position_ids=None, width: int = 0, mode: str = "train",
                      **kwargs):
    """rlhf.rollout.PolicyAndCritic.forward, except that sampling draws every row alone, seeded by its prompt.

    PPO seeds its sampler per process, so a 2-process run draws other responses than a 1-process run, and two
    different draws cannot be compared number for number. Seeded by the prompt, a row gets the same response
    whichever process and batch it lands in; what is left to compare is everything downstream: the prompt split,
    the all-reduced updates, the metrics gathered over processes. EOS is suppressed, so every response has the
    same length and every process's token-mean weighs its tokens as the 1-process mean does."""
    from rlhf import losses, rollout

    if mode != "generate":
        return PLAIN_FORWARD(self, input_ids, attention_mask, position_ids, width, mode, **kwargs)
    recorder = kwargs.pop("logits_processor")[0]
    eos = self.policy.generation_config.eos_token_id
    kwargs.update(eos_token_id=None, suppress_tokens=[eos] if isinstance(eos, int) else list(eos))
    responses, logprobs = [], []
    for ids, mask in zip(input_ids, attention_mask):
        prompt = ids[mask.bool()][None]  # (1, q): the left padding dropped
        torch.manual_seed(zlib.crc32(str(prompt.tolist()).encode()))
        sequence = self.policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        response = sequence[:, prompt.shape[1]:]  # (1, R)
        logits = rollout.policy_logits(self.policy, sequence, torch.ones_like(sequence), None, response.shape[1])
        logprobs.append(losses.logprobs_from_logits(logits.float() / kwargs["temperature"], response))
        responses.append(response)
    recorder.result = lambda _: torch.cat(logprobs)  # (B, R): what PPO's recorder would have given
    return torch.cat([input_ids, torch.cat(responses)], 1)


def _ppo_worker(config_json: str, result_file: str, forward=sample_rows_alone) -> None:
    """One process of a PPO run with PolicyAndCritic.forward replaced; the main process writes the history."""
    from rlhf import ppo, rollout

    global PLAIN_FORWARD
    PLAIN_FORWARD = rollout.PolicyAndCritic.forward
    rollout.PolicyAndCritic.forward = forward
    result = ppo.run(ppo.PPOConfig(**json.loads(config_json)))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps({"processes": result["processes"], "history": result["history"]}))


PPO_COMMON = dict(reward_model="", reward_fn="length:8", device="cpu", precision="fp32", steps=3, ppo_epochs=2,
                  max_new_tokens=8, stop_at_eos=False, learning_rate=1e-3, whiten_advantages=False,
                  backend="hf")  # sample_rows_alone patches transformers' path (the DDP sampler path: test_ppo)


def _ppo(launcher: str, out: Path, options: dict) -> dict:
    """A PPO run through the worker below: its history and metrics.json."""
    _launch(launcher, str(Path(__file__).resolve()), "ppo", json.dumps({**options, "output_dir": str(out)}),
            str(out / "result.json"), processes=1 if launcher == "cpu.yaml" else 2)
    return {**json.loads((out / "result.json").read_text()), "metrics": _metrics(out)}


@pytest.fixture(scope="module")
def ppo_one_process(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ppo-one")
    return out, _ppo("cpu.yaml", out, {**PPO_COMMON, "model": tiny_model_dir, "batch_size": 4, "mini_batch_size": 4})


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ppo_two_processes_agree_with_one(tmp_path, launcher, ppo_one_process, tiny_model_dir):
    # One minibatch per rollout batch, so each PPO epoch is one update on the whole global batch (with smaller
    # minibatches a process's minibatch would hold other rows than the 1-process run's). Advantages are whitened
    # per process (rlhf.ppo whitens each process's batch), which differs from whitening the global batch: off here.
    one_dir, one = ppo_one_process
    two = _ppo(launcher, tmp_path, {**PPO_COMMON, "model": tiny_model_dir, "batch_size": 2, "mini_batch_size": 2})
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["metrics"]["distributed"] == LAUNCHERS[launcher]
    # The global batch: 4 rollouts per step either way.
    assert [h["episode"] for h in one["history"]] == [h["episode"] for h in two["history"]] == [4, 8, 12]
    for a, b in zip(one["history"], two["history"]):
        assert b["objective/scores"] == pytest.approx(a["objective/scores"], abs=1e-6)  # the same responses
        for key in ("objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
                    "val/response_length"):
            assert b[key] == pytest.approx(a[key], rel=METRIC_REL, abs=1e-6), (a["step"], key)
    assert one["history"][-1]["objective/kl"] > 1e-3  # the policy moved, so the agreement above says something
    gap = _relative_gap(_weights(one_dir), _weights(tmp_path), _weights(tiny_model_dir))
    assert gap < WEIGHT_GAP, gap
    if launcher in SHARDED:
        _same_model_directory(one_dir, tmp_path, "causal-lm")


def stop_unevenly(self, input_ids, attention_mask, position_ids=None, width: int = 0, mode: str = "train",
                  **kwargs):
    """rlhf.rollout.PolicyAndCritic.forward, except that sampling ends every response of process 0 with EOS as its
    third token and none of process 1 before max_new_tokens (EOS suppressed); writes each sample's width to
    RESULT_FILE.<rank>."""
    from transformers import LogitsProcessor

    if mode != "generate":
        return PLAIN_FORWARD(self, input_ids, attention_mask, position_ids, width, mode, **kwargs)
    rank, start, eos = int(os.environ["RANK"]), input_ids.shape[1], kwargs["eos_token_id"][0]

    class Uneven(LogitsProcessor):
        def __call__(self, ids, scores):
            if rank == 0 and ids.shape[1] - start >= 2:
                scores[:, :] = -float("inf")
                scores[:, eos] = 0.0
            elif rank == 1:
                scores[:, eos] = -float("inf")
            return scores

    kwargs["logits_processor"].insert(0, Uneven())
    sequences = PLAIN_FORWARD(self, input_ids, attention_mask, position_ids, width, mode, **kwargs)
    with open(f"{os.environ['RESULT_FILE']}.{rank}", "a") as f:
        f.write(f"{sequences.shape[1] - start}\n")
    return sequences


@pytest.mark.slow
@pytest.mark.parametrize("launcher", SHARDED)
def test_ppo_sharded_sampling_with_uneven_stops_does_not_hang(tmp_path, launcher, tiny_model_dir):
    """With sharded weights a process whose responses all end early must still take part until the last process is
    done (FSDP gathers each layer in every decoding step; under ZeRO-3 rlhf gathers the policy whole for the
    rollout): otherwise the other process waits for it forever. Bounded by the launch's timeout."""
    config = {**PPO_COMMON, "model": tiny_model_dir, "steps": 2, "max_new_tokens": 12, "stop_at_eos": True,
              "batch_size": 2, "mini_batch_size": 2, "output_dir": str(tmp_path / "out")}
    result = tmp_path / "widths"
    os.environ["RESULT_FILE"] = str(result)  # read by the launched processes
    try:
        _launch(launcher, str(Path(__file__).resolve()), "ppo-uneven", json.dumps(config), str(tmp_path / "r.json"),
                processes=2, timeout=300)
    finally:
        del os.environ["RESULT_FILE"]
    widths = [[int(w) for w in Path(f"{result}.{rank}").read_text().split()] for rank in (0, 1)]
    assert widths == [[3, 3], [12, 12]]  # one sample per step on each process, of very different lengths
    assert _metrics(tmp_path / "out")["distributed"] == LAUNCHERS[launcher]


@pytest.mark.slow
def test_fsdp1_on_cpu_processes_is_refused_in_one_line(tmp_path, tiny_model_dir, preference_dir):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "rlhf.cli", "dpo", "--config",
           "configs/dpo.yaml", "--model", tiny_model_dir, "--data", preference_dir, "--device", "cpu",
           "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert ("rlhf dpo: error: FSDP1 with sync_module_states (configs/accelerate/fsdp.yaml) does not run on CPU "
            "processes") in proc.stderr
    assert "Traceback" not in proc.stderr.split("rlhf dpo: error:")[0]  # the stage's own message, no traceback
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", SHARDED)
def test_ppo_guard_under_sharded_weights_is_refused_in_one_line(tmp_path, launcher, tiny_model_dir):
    """The guard keeps a copy of the best policy's weights, which under sharding would be shards."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / launcher),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "rlhf.cli", "ppo", "--config",
           "configs/ppo.yaml", "--model", tiny_model_dir, "--reward_model", "", "--reward_fn", "length:8",
           "--device", "cpu", "--steps", "2", "--guard_kl", "5", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "rlhf ppo: error: the over-optimisation guard keeps the best policy's weights" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------- the README's commands


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Many GPUs and many machines")
    return text[start : text.index("\n## ", start + 1)]


def _readme_commands() -> list[list[str]]:
    """Every `accelerate launch ...` command of the section, backslash continuations joined, split as a shell does."""
    joined = _readme_section().replace("\\\n", " ")
    return [shlex.split(line.strip(), comments=True) for line in joined.splitlines()
            if line.strip().startswith("accelerate launch ")]


def test_readme_commands_name_real_configs_and_stages():
    from accelerate.commands.launch import launch_command_parser

    from rlhf.cli import STAGES, build_parser

    stages = {name for name, *_ in STAGES}
    commands = _readme_commands()
    assert len(commands) >= 8
    named: set[str] = set()
    seen_stages: set[str] = set()
    for argv in commands:
        launch_args = argv[2:]
        # accelerate's own parser takes the launcher's options (a typo in a flag fails here) ...
        parsed = launch_command_parser().parse_args(launch_args)
        config_file = ROOT / parsed.config_file
        assert config_file.is_file() and config_file.parent == ACCELERATE, parsed.config_file
        named.add(config_file.name)
        assert parsed.module and parsed.training_script == "rlhf.cli", argv
        # ... and rlhf's parser the stage's: `--config configs/<stage>.yaml` for that same stage.
        stage_argv = parsed.training_script_args
        stage = stage_argv[0]
        assert stage in stages, stage
        config = stage_argv[stage_argv.index("--config") + 1]
        assert re.fullmatch(r"configs/(\w+)\.yaml", config) and config == f"configs/{stage}.yaml", argv
        assert (ROOT / config).is_file(), config
        build_parser(stage_argv).parse_args(stage_argv)
        seen_stages.add(stage)
    assert seen_stages == {"sft", "reward", "dpo", "ppo"}
    # Every accelerate config is in the section's table and has a command.
    section = _readme_section()
    for path in ACCELERATE.glob("*.yaml"):
        assert f"| `{path.name}` |" in section, path.name
    assert named == {p.name for p in ACCELERATE.glob("*.yaml")}
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert flag in section, flag


if __name__ == "__main__" and sys.argv[1:2] == ["ppo"]:
    _ppo_worker(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and sys.argv[1:2] == ["ppo-uneven"]:
    _ppo_worker(sys.argv[2], sys.argv[3], stop_unevenly)
