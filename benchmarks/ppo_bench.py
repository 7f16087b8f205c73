"""Our PPO (rlhf.ppo) against TRL 1.12's `trl.experimental.ppo.PPOTrainer` (the last TRL with PPO), side by side.

    python benchmarks/ppo_bench.py                         # tiny model, then SmolLM2-135M-Instruct (CPU: ~20 min)
    python benchmarks/ppo_bench.py --models tiny --steps 6 --batch 16 --repeats 5
    python benchmarks/ppo_bench.py --trl-gradient-checkpointing true     # TRL with checkpointing really on

TRL 1.12 goes into its own virtual environment (default `$RLHF_HOME/venvs/trl112`, created on the first run with
`pip install torch==2.13.0 trl==1.12.0 transformers==<ours> accelerate==<ours>`: the same torch, transformers and
accelerate as ours, so both run the same model code). Each side runs in a fresh subprocess on the same policy,
reward model (the critic starts from it on both sides), prompts, rollout batch, micro-batch, response length,
PPO epochs, temperature, learning rate and precision (`auto`: bf16 where the CPU has native bf16, as rlhf.models
picks).

Matched settings: one minibatch per rollout batch of `--batch` prompts, processed in micro-batches of `--micro`
with gradient accumulation (TRL: per_device_train_batch_size=micro, gradient_accumulation_steps=batch/micro,
num_mini_batches=1); every response is exactly `--new-tokens` long (TRL: stop_token=None; ours:
stop_at_eos=false), so both sides process the same number of tokens.

Two things TRL 1.12's configuration promises do not happen under transformers 5, and the table says what each
side really ran (read back from the trainer, not from its arguments):
  - precision: `bf16=True` is ignored. transformers 5's TrainingArguments no longer exports
    ACCELERATE_MIXED_PRECISION and PPOTrainer builds its own `Accelerator()` from the environment, so TRL trains
    and samples in fp32 (only the frozen reference and reward models, loaded here in bf16, run in bf16). With a
    low precision the TRL side therefore runs twice: as configured ("bf16=True", effectively fp32) and with
    ACCELERATE_MIXED_PRECISION set, so that it really autocasts as ours does. Which of the two is faster depends on
    the model (on this CPU bf16 is slower for the tiny model and faster for SmolLM2).
  - gradient checkpointing: PPOConfig defaults it to true, but only Trainer.__init__ (which PPOTrainer does not
    call) turns it on under transformers 5, so TRL runs without it. `--trl-gradient-checkpointing true` enables it on
    the policy, as TRL did under transformers 4.

Ours changes the allocator in-process on a CPU (huge pages for PyTorch's large tensors, set on importing rlhf;
glibc keeping freed memory during the PPO loop): a training step maps and frees the same large tensors every
micro-batch, and on a VM every fresh page costs a fault. TRL as shipped does neither; the bench also runs it
with the same settings given through the environment (`TRL +env +alloc`, `--no-trl-allocator` to leave it out),
so the table shows how much of the difference is the allocator. The verdict is against TRL as it runs by default.

The sides run alternately, `--repeats` times (the order rotating), so load from other processes hits all alike.
Per run: the median step time (first step dropped as warm-up) and the process's peak resident memory; per side the
median over runs (the range of the run medians beside it). The verdict compares ours with the faster TRL variant
and with the smaller TRL peak memory. Target on a 2-core CPU: ours >= 1.5x faster with no more memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_PINS = ["torch==2.13.0", "trl==1.12.0"]
# What rlhf does to the allocator in-process (rlhf/__init__.py: huge pages for PyTorch's large CPU tensors;
# rlhf.models.reuse_freed_memory: glibc keeps freed memory), given to TRL through the environment: glibc reads
# MALLOC_* at start-up, PyTorch THP_MEM_ALLOC_ENABLE at import.
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


# ---------------------------------------------------------------- workers (each runs in its own process)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker_ours(job: dict) -> dict:
    from rlhf.ppo import PPOConfig, run

    config = PPOConfig(
        model=job["policy"], reward_model=job["reward"], prompts=job["prompts_file"], prompt_split="",
        steps=job["steps"], batch_size=job["batch"], mini_batch_size=job["batch"],
        gradient_accumulation_steps=job["batch"] // job["micro"], ppo_epochs=job["epochs"],
        max_new_tokens=job["new_tokens"], stop_at_eos=False, temperature=0.7, learning_rate=job["lr"],
        kl_coef=0.05, normalize_reward=False, device=job["device"], precision=job["precision"],
        gradient_checkpointing=job["ours_gc"], output_dir=job["output_dir"], seed=0)
    result = run(config)
    return {"step_seconds": [h["time/step_seconds"] for h in result["history"]], "peak_rss_mb": peak_rss_mb(),
            "tokens": [h["val/response_length"] for h in result["history"]], "gradient_checkpointing": job["ours_gc"],
            "precision": "fp32" if result["precision"] == "fp32" else f"{result['precision']} autocast", **gpu_peak()}


def worker_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job["precision"], torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["policy"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Trained weights in fp32, as TRL's Trainer expects for mixed precision; frozen ones in the compute dtype.
    policy = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(job["reward"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(job["reward"], num_labels=1, dtype=dtype)
    for m in (value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id
    if job["trl_gc"]:
        # What TRL's Trainer did under transformers 4; under 5 nothing in PPOTrainer turns it on (see the docstring).
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = Dataset.from_dict({"input_ids": job["prompt_ids"]})
    gc_kwargs = {} if job["trl_gc"] is None else {"gradient_checkpointing": job["trl_gc"]}
    args = PPOConfig(
        output_dir=job["output_dir"], per_device_train_batch_size=job["micro"],
        gradient_accumulation_steps=job["batch"] // job["micro"], num_mini_batches=1,
        total_episodes=job["steps"] * job["batch"], response_length=job["new_tokens"], num_ppo_epochs=job["epochs"],
        temperature=0.7, learning_rate=job["lr"], kl_coef=0.05, stop_token=None, missing_eos_penalty=None,
        bf16=job["precision"] == "bf16", fp16=job["precision"] == "fp16", use_cpu=job["device"] == "cpu",
        report_to="none", num_sample_generations=0, save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **gc_kwargs)

    class Timer(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=data, eval_dataset=data)
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    mixed = trainer.accelerator.mixed_precision
    return {"step_seconds": steps, "peak_rss_mb": peak_rss_mb(), "gradient_checkpointing": bool(
                getattr(policy, "is_activation_checkpointing", None) or policy.is_gradient_checkpointing),
            "precision": f"{mixed} autocast" if mixed in ("bf16", "fp16") else f"fp32 (frozen {job['precision']})",
            **gpu_peak()}


def gpu_peak() -> dict:
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}


# ---------------------------------------------------------------- the parent


def trl_python(venv: Path) -> str:
    """The TRL 1.12 environment's python, creating the environment on first use."""
    python = venv / "bin" / "python"
    if python.is_file():
        return str(python)
    import accelerate
    import transformers

    pins = TRL_PINS + [f"transformers=={transformers.__version__}", f"accelerate=={accelerate.__version__}"]
    print(f"Creating {venv} with {' '.join(pins)} (once, ~2 min)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    return str(python)


def prepare_models(which: str, workdir: Path, home: Path) -> tuple[str, str]:
    """(policy dir, reward model dir) for `tiny` or `smollm2`; the reward model is the policy's backbone with a
    seeded scalar head (untrained: the benchmark measures speed, not alignment)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if which == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_causal_lm, build_tiny_reward_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        policy, reward = workdir / "tiny-policy", workdir / "tiny-reward"
        build_tiny_causal_lm(tokenizer).save_pretrained(policy)
        build_tiny_reward_model(tokenizer).save_pretrained(reward)
        tokenizer.save_pretrained(policy)
        tokenizer.save_pretrained(reward)
        return str(policy), str(reward)
    from rlhf.models import DEFAULT_MODEL, load_tokenizer, resolve

    policy = resolve(DEFAULT_MODEL)
    reward = home / "bench" / "smollm2-reward"
    if not (reward / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
        model.save_pretrained(reward, safe_serialization=True)
        load_tokenizer(policy).save_pretrained(reward)
    return policy, str(reward)


def run_worker(python: str, side: str, job: dict, workdir: Path, threads: int | None, extra_env: dict) -> dict:
    job_file = workdir / f"job-{side}.json"
    out_file = workdir / f"result-{side}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", **extra_env}
    for name in ("ACCELERATE_MIXED_PRECISION", *ALLOCATOR_ENV):  # each side runs as its own configuration says
        if name not in extra_env:
            env.pop(name, None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([python, __file__, "--worker", side, str(job_file), str(out_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--steps", type=int, default=0, help="PPO steps per side (default: tiny 8, smollm2 4)")
    ap.add_argument("--batch", type=int, default=0, help="rollouts per step (default: tiny 16, smollm2 8)")
    ap.add_argument("--micro", type=int, default=0, help="micro-batch size (default: batch / 2)")
    ap.add_argument("--new-tokens", type=int, default=0, help="response length (default: tiny 32, smollm2 24)")
    ap.add_argument("--epochs", type=int, default=0, help="PPO epochs (default: tiny 4, smollm2 1)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per side, alternating (default: tiny 3, smollm2 2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=-1, help="OMP_NUM_THREADS for both sides (0: torch's default, "
                    "all cores; default: tiny 1, smollm2 0)")
    ap.add_argument("--trl-gradient-checkpointing", default="default", choices=["default", "true", "false"],
                    help="TRL's setting (its PPOConfig says true, but PPOTrainer leaves it off under transformers 5; "
                         "true turns it on)")
    ap.add_argument("--trl-amp", default="both", choices=["both", "configured", "env"],
                    help="with a low precision, run TRL as configured (bf16=True, effectively fp32), with "
                         "ACCELERATE_MIXED_PRECISION set (really autocast), or both")
    ap.add_argument("--trl-allocator", action=argparse.BooleanOptionalAction, default=True,
                    help="on a CPU, also run TRL (autocast where it applies) with the allocator settings rlhf makes "
                         "in-process (huge pages, glibc keeping freed memory), so the table shows how much of the "
                         "difference they are; the verdict is against TRL as it runs by default")
    ap.add_argument("--ours-gradient-checkpointing", action="store_true")
    ap.add_argument("--trl-venv", default="", help="TRL 1.12 environment (default $RLHF_HOME/venvs/trl112)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        side, job_file, out_file = args.worker
        job = json.loads(Path(job_file).read_text())
        result = worker_ours(job) if side == "ours" else worker_trl(job)
        Path(out_file).write_text(json.dumps(result))
        return

    import torch

    from rlhf.config import rlhf_home
    from rlhf.data import read_prompts
    from rlhf.models import pick_device, pick_dtype
    from rlhf.sample import render_prompt

    home = rlhf_home()
    python_trl = trl_python(Path(args.trl_venv) if args.trl_venv else home / "venvs" / "trl112")
    device = pick_device(args.device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(pick_dtype(device, args.precision), "fp32")
    # The tiny model is all per-op overhead: a second thread only adds synchronisation (the test suite pins one
    # too), and on a shared machine a preempted second thread stalls every op, both sides alike.
    defaults = {"tiny": dict(steps=8, batch=16, new_tokens=32, epochs=4, lr=1e-4, repeats=3, threads=1),
                "smollm2": dict(steps=4, batch=8, new_tokens=24, epochs=1, lr=1e-6, repeats=2, threads=0)}
    trl_gc = {"default": None, "true": True, "false": False}[args.trl_gradient_checkpointing]
    # (label, python, extra environment) per side
    sides = [("ours", sys.executable, {})]
    if precision == "fp32" or args.trl_amp in ("both", "configured"):
        sides.append(("TRL 1.12", python_trl, {}))
    if precision != "fp32" and args.trl_amp in ("both", "env"):
        sides.append(("TRL 1.12 +env", python_trl, {"ACCELERATE_MIXED_PRECISION": precision}))
    if args.trl_allocator and device.type == "cpu":
        amp = {"ACCELERATE_MIXED_PRECISION": precision} if precision != "fp32" and args.trl_amp != "configured" else {}
        sides.append(("TRL 1.12 +alloc" if not amp else "TRL +env +alloc", python_trl, {**amp, **ALLOCATOR_ENV}))
    rows = []
    for which in args.models:
        d = defaults[which]
        steps, batch = args.steps or d["steps"], args.batch or d["batch"]
        micro = args.micro or max(1, batch // 2)
        if batch % micro:
            sys.exit("--batch must be a multiple of --micro")
        repeats = args.repeats or d["repeats"]
        results: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
        with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
            workdir = Path(tmp)
            policy, reward = prepare_models(which, workdir, home)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(policy)
            prompts = read_prompts("sentiment", split="train")
            prompts_file = workdir / "prompts.jsonl"
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
                          for p in prompts]
            job = dict(policy=policy, reward=reward, prompts_file=str(prompts_file), prompt_ids=prompt_ids,
                       steps=steps, batch=batch, micro=micro, new_tokens=args.new_tokens or d["new_tokens"],
                       epochs=args.epochs or d["epochs"], lr=d["lr"], device=device.type, precision=precision,
                       ours_gc=args.ours_gradient_checkpointing, trl_gc=trl_gc)
            threads = (args.threads if args.threads >= 0 else d["threads"]) or None
            for r in range(repeats):
                for k in range(len(sides)):  # rotate the order every repeat
                    label, python, env = sides[(k + r) % len(sides)]
                    tag = "ours" if label == "ours" else "trl"
                    out = {**job, "output_dir": str(workdir / f"{tag}-{r}-{k}")}
                    result = run_worker(python, tag, out, workdir, threads, env)
                    times = result["step_seconds"][1:] or result["step_seconds"]
                    result["median_step"] = statistics.median(times)
                    results[label].append(result)
                    print(f"  {which} run {r + 1}/{repeats} {label:<16} median step {result['median_step']:.3f} s, "
                          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
        rows.append((which, job, repeats, threads or torch.get_num_threads(), results))

    print(f"\nPPO step time and peak memory, ours (rlhf.ppo) vs TRL 1.12 PPOTrainer, on {device} (precision "
          f"{precision}); per side the median over runs of each run's median step after a warm-up step [range of "
          f"the run medians]")
    header = (f"{'model':<8} {'batch x tokens':>14} {'epochs':>6} {'threads':>7} {'side':<16} {'ran as':<22} "
              f"{'ckpt':<4} {'step s':>7} {'[range]':>13} {'peak RSS MB':>12}")
    print(header + ("   peak GPU MB" if device.type == "cuda" else ""))
    verdicts = []
    for which, job, _repeats, threads, results in rows:
        shape = f"{job['batch']} x {job['new_tokens']}"
        med, rss = {}, {}
        for label, runs in results.items():
            steps_ = [r["median_step"] for r in runs]
            med[label] = statistics.median(steps_)
            rss[label] = statistics.median(r["peak_rss_mb"] for r in runs)
            gc = "on" if runs[0]["gradient_checkpointing"] else "off"
            gpu = f" {statistics.median(r['peak_gpu_mb'] for r in runs):13.0f}" if "peak_gpu_mb" in runs[0] else ""
            spread = f"[{min(steps_):.2f}-{max(steps_):.2f}]"
            print(f"{which:<8} {shape:>14} {job['epochs']:>6} {threads:>7} {label:<16} {runs[0]['precision']:<22} "
                  f"{gc:<4} {med[label]:7.2f} {spread:>13} {rss[label]:12.0f}{gpu}")
        trl_labels = [label for label in results if label != "ours"]
        for label in trl_labels:
            print(f"{'':<8} {'':>14} {'':>6} {'':>7} {label + ' / ours':<39} {med[label] / med['ours']:8.2f}x "
                  f"{'':>13} {rss[label] / rss['ours']:11.2f}x")
        shipped = [label for label in trl_labels if "alloc" not in label]
        fastest = min(shipped, key=lambda label: med[label])
        leanest = min(shipped, key=lambda label: rss[label])
        speedup, memory = med[fastest] / med["ours"], rss[leanest] / rss["ours"]
        verdicts.append(f"{which}: {speedup:.2f}x faster than the faster TRL ({fastest}), memory ratio {memory:.2f} "
                        f"against the smaller TRL peak ({leanest}): "
                        f"{'met' if speedup >= 1.5 and memory >= 1 else 'not met'}")
        for label in (label for label in trl_labels if "alloc" in label):
            verdicts.append(f"{which}: with rlhf's allocator settings TRL too ({label}): "
                            f"{med[label] / med['ours']:.2f}x, memory ratio {rss[label] / rss['ours']:.2f}")
    print("(speed-up = TRL step / ours; memory ratio = TRL peak RSS / ours, >= 1 means ours uses no more)")
    for line in verdicts:
        print(line)
    print("Target: speed-up >= 1.5x with memory ratio >= 1.")


if __name__ == "__main__":
    main()
