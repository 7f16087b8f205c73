"""Our critic-free RL (rlhf.ppo with estimator=rloo / grpo) against TRL 1.16's `trl.RLOOTrainer` and
`trl.GRPOTrainer`, side by side: step time and peak memory.

    python benchmarks/rl_bench.py                                  # tiny, then SmolLM2-135M-Instruct; rloo and grpo
    python benchmarks/rl_bench.py --models tiny --estimators rloo --steps 6 --repeats 5
    python benchmarks/rl_bench.py --trl-gradient-checkpointing     # TRL as its config defaults (checkpointing on)

TRL 1.16 is the one in this environment (same torch, transformers and accelerate as ours). Each run is a fresh
subprocess; the sides alternate `--repeats` times, the order rotating, so load from other processes hits both alike.
Per run: the median step time with the first step dropped as warm-up, and the process's peak resident memory
(VmHWM: ru_maxrss would include the parent's memory, see `peak_rss_mb`); per side the median over runs, the range of
the run medians beside it. A step is ours' `time/step_seconds` (sampling through the update); TRL's is the time
between consecutive `on_step_end` callbacks (the same phases plus the Trainer loop's own work between steps; TRL
logs once, after the last step, so logging is outside both).

Matched on both sides: policy, reward model (the same weights: TRL gets it as a sequence-classification
`reward_funcs`), prompts (chat messages through the policy's chat template), k samples per prompt (TRL:
num_generations), `--batch` responses per step (TRL: generation_batch_size = per_device_train_batch_size x
gradient_accumulation_steps, so one generation batch per optimizer step), one optimizer step per rollout batch in
micro-batches of `--micro` (ours: mini_batch_size = batch, gradient_accumulation_steps = batch / micro, ppo_epochs
1; TRL: per_device_train_batch_size = micro, gradient_accumulation_steps = batch / micro, steps_per_generation
defaulting to it, num_iterations 1), temperature 0.7 (top-k and top-p off), learning rate with linear decay, max
grad norm 1, fused AdamW (weight decay: ours torch's 0.01, TRL 0; no cost), KL coefficient 0.05 with a frozen
reference (TRL GRPO's default beta is 0, which loads no reference; set to 0.05 here), the KL where each trainer's
method puts it (RLOO: in the reward; GRPO: a k3 term in the loss), dropout off, no reward normalisation or advantage
whitening beyond the method's own, precision (`auto`: bf16 where the CPU has native bf16, as rlhf.models picks;
TRL's bf16/fp16 flag set to match, trained weights fp32 on both sides), frozen models (reference, reward) held in
the compute dtype (TRL: model_init_kwargs dtype for the reference it builds itself) and gradient checkpointing off
(TRL's config defaults it on; `--trl-gradient-checkpointing`).

Response length: every response is sampled for exactly `--new-tokens` tokens. Ours: stop_at_eos=false. TRL has no
such switch (min_new_tokens would forbid EOS, a different distribution): its generation config carries the EOS
ids, and transformers 5 fills an unset eos_token_id from the model's generation_config, which Trainer.train
re-aligns with the tokenizer's EOS. So the bench gives generation_kwargs={"eos_token_id": None} and clears the
policy's generation_config.eos_token_id in on_train_begin, after that re-alignment (TRL read its EOS ids for
masking in __init__). Checked with EOS made near-certain: 16 of 16 tokens sampled, 1 kept; without the clearing,
generation stopped after 1. Both sides still mask everything after a sampled EOS and trim the padding columns
(ours per micro-batch, TRL per generation batch), as in real use. Every `generate` call's new-token width is
recorded on both sides (`gen` column) and the masked mean response length printed (`resp`): what each side ran.

Not like-for-like, by the trainers' design (what the comparison measures, not settings one could match):
  - TRL's RLOO computes the policy's log-probs of the rollout in an extra no-grad forward pass (always, even
    on-policy); ours takes them from the sampler's logits. TRL's GRPO skips it on-policy, as configured here.
  - TRL computes log-probs through a fused, chunked LM head (no full logits tensor); ours computes logits for the
    response positions only. TRL's reward model reads decoded text re-tokenized through the chat template; ours
    feeds token ids when the reward model shares the policy's tokenizer (the same text either way).
  - Ours changes the allocator in-process on a CPU (huge pages, glibc keeping freed memory; see ppo_bench.py);
    `--trl-allocator` adds a TRL run with the same settings given through the environment. The verdict is
    against TRL as it runs by default.
  - The losses differ in their normalisation (TRL GRPO's default loss_type is dapo; TRL RLOO's KL is per sequence),
    which changes the numbers learned, not the work done per step.
Target: ours >= 1.5x faster per step with no more peak memory, per model and estimator.
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

from ppo_bench import ALLOCATOR_ENV, ROOT, gpu_peak, prepare_models

KL_COEF, TEMPERATURE = 0.05, 0.7
# Where each method puts the KL penalty, as TRL's trainer for it does.
KL_PENALTY = {"rloo": "reward", "grpo": "loss"}


# ---------------------------------------------------------------- workers (each runs in its own process)


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started: VmHWM, the high-water mark of its own address space.
    Not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across exec, so every worker
    would read at least what the parent held (the parent that built SmolLM2's reward model: 4 GB on both sides)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def record_generated_widths(ours: bool = False) -> list[int]:
    """Every `generate` call of this process (and with `ours`, every `rlhf.sampler.sample` call: our rollouts'
    sampler) appends how many new tokens it produced (the same for every row). TRL's worker never imports rlhf."""
    from transformers.generation.utils import GenerationMixin

    widths: list[int] = []
    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        widths.append(getattr(out, "sequences", out).shape[1] - prompt.shape[1])
        return out

    GenerationMixin.generate = generate
    if ours:
        from rlhf import sampler

        original_sample = sampler.sample

        def sample(*args, **kwargs):
            out = original_sample(*args, **kwargs)
            widths.append(out.tokens.shape[1])
            return out

        sampler.sample = sample
    return widths


def worker_ours(job: dict) -> dict:
    from rlhf.ppo import PPOConfig, run

    widths = record_generated_widths(ours=True)
    config = PPOConfig(
        model=job["policy"], reward_model=job["reward"], prompts=job["prompts_file"], prompt_split="",
        estimator=job["estimator"], samples_per_prompt=job["k"], kl_penalty=KL_PENALTY[job["estimator"]],
        steps=job["steps"], batch_size=job["batch"], mini_batch_size=job["batch"],
        gradient_accumulation_steps=job["batch"] // job["micro"], ppo_epochs=1, max_new_tokens=job["new_tokens"],
        stop_at_eos=False, temperature=TEMPERATURE, learning_rate=job["lr"], kl_coef=KL_COEF,
        normalize_reward=False, whiten_advantages=False, device=job["device"], precision=job["precision"],
        gradient_checkpointing=job["ours_gc"], output_dir=job["output_dir"], seed=0)
    result = run(config)
    return {"step_seconds": [h["time/step_seconds"] for h in result["history"]], "generated": widths,
            "response_length": statistics.mean(h["val/response_length"] for h in result["history"]),
            "gradient_checkpointing": job["ours_gc"], "peak_rss_mb": peak_rss_mb(),
            "precision": "fp32" if result["precision"] == "fp32" else f"{result['precision']} autocast", **gpu_peak()}


def worker_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    widths = record_generated_widths()
    Config, Trainer = (RLOOConfig, RLOOTrainer) if job["estimator"] == "rloo" else (GRPOConfig, GRPOTrainer)
    frozen = {"bf16": "bfloat16", "fp16": "float16"}.get(job["precision"], "float32")
    tokenizer = AutoTokenizer.from_pretrained(job["policy"], padding_side="left")
    # Trained weights in fp32, as the Trainer expects for mixed precision; the reward model in the compute dtype.
    policy = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(job["reward"], num_labels=1,
                                                                dtype=getattr(torch, frozen))
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in job["prompts"]]})
    args = Config(
        output_dir=job["output_dir"], per_device_train_batch_size=job["micro"],
        gradient_accumulation_steps=job["batch"] // job["micro"], num_generations=job["k"], num_iterations=1,
        max_steps=job["steps"], max_completion_length=job["new_tokens"], generation_kwargs={"eos_token_id": None},
        temperature=TEMPERATURE, top_k=0, top_p=1.0, learning_rate=job["lr"], lr_scheduler_type="linear",
        beta=KL_COEF, disable_dropout=True, gradient_checkpointing=job["trl_gc"],
        # Read for the reference model TRL builds itself (the policy, given as a model, ignores them).
        model_init_kwargs={"dtype": frozen},
        bf16=job["precision"] == "bf16", fp16=job["precision"] == "fp16", use_cpu=job["device"] == "cpu",
        # One log at the end (the metrics averaged over the steps), after the last timed step, as ours logs
        # outside its step time.
        report_to="none", save_strategy="no", logging_steps=job["steps"], seed=0, dataloader_num_workers=0,
        disable_tqdm=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *a, **k):
            # After Trainer.train aligned the generation config's EOS with the tokenizer's again (TRL read its EOS
            # ids for masking in __init__); left set, generate would fill it back into TRL's generation config.
            policy.generation_config.eos_token_id = None
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):  # after the optimizer step, so a mark per rollout batch
            self.marks.append(time.perf_counter())

    timer = Timer()
    trainer = Trainer(model=policy, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    mixed = trainer.accelerator.mixed_precision
    return {"step_seconds": [b - a for a, b in zip(timer.marks, timer.marks[1:])], "generated": widths,
            "response_length": statistics.mean(lengths), "gradient_checkpointing": policy.is_activation_checkpointing,
            "peak_rss_mb": peak_rss_mb(), "precision": f"{mixed} autocast" if mixed in ("bf16", "fp16") else "fp32",
            **gpu_peak()}


# ---------------------------------------------------------------- the parent


def run_worker(side: str, job: dict, workdir: Path, threads: int | None, extra_env: dict) -> dict:
    """One side's run in a fresh process (its output in `<side>.log`); adds the median step after the warm-up."""
    job_file, out_file, log_file = (workdir / f"{side}.{ext}" for ext in ("job.json", "result.json", "log"))
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("ACCELERATE_MIXED_PRECISION", *ALLOCATOR_ENV):  # each side runs as its configuration says
        env.pop(name, None)
    env.update(extra_env)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    worker = "ours" if side == "ours" else "trl"
    with log_file.open("w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", worker, str(job_file), str(out_file)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{side} worker failed (exit {proc.returncode}):\n{log_file.read_text()[-4000:]}")
    result = json.loads(out_file.read_text())
    times = result["step_seconds"][1:] or result["step_seconds"]
    return {**result, "median_step": statistics.median(times)}


def summarise(rows: list, device, precision: str) -> list[str]:
    """Print the table; return the verdict lines (one per model and estimator)."""
    print(f"\nCritic-free RL step time and peak memory, ours (rlhf.ppo) vs TRL 1.16, on {device} (precision "
          f"{precision}); per side the median over runs of each run's median step after a warm-up step [range of "
          f"the run medians]; gen = new tokens per generate call, resp = mean response length after EOS masking")
    print(f"{'model':<8} {'method':<6} {'k x prompts x tok':>17} {'thr':>3} {'side':<10} {'ran as':<13} {'ckpt':<4} "
          f"{'gen':>7} {'resp':>5} {'step s':>7} {'[range]':>13} {'peak RSS MB':>12}"
          + ("  peak GPU MB" if device.type == "cuda" else ""))
    verdicts = []
    for which, estimator, job, threads, results in rows:
        shape = f"{job['k']} x {job['batch'] // job['k']} x {job['new_tokens']}"
        med = {side: statistics.median(r["median_step"] for r in runs) for side, runs in results.items()}
        rss = {side: statistics.median(r["peak_rss_mb"] for r in runs) for side, runs in results.items()}
        for side, runs in results.items():
            steps = [r["median_step"] for r in runs]
            gen = sorted({w for r in runs for w in r["generated"]})
            gen_text = f"{gen[0]}" if len(gen) == 1 else f"{gen[0]}-{gen[-1]}"
            resp = statistics.mean(r["response_length"] for r in runs)
            gpu = f" {statistics.median(r['peak_gpu_mb'] for r in runs):12.0f}" if "peak_gpu_mb" in runs[0] else ""
            print(f"{which:<8} {estimator:<6} {shape:>17} {threads:>3} {side:<10} {runs[0]['precision']:<13} "
                  f"{'on' if runs[0]['gradient_checkpointing'] else 'off':<4} {gen_text:>7} {resp:5.1f} "
                  f"{med[side]:7.2f} {f'[{min(steps):.2f}-{max(steps):.2f}]':>13} {rss[side]:12.0f}{gpu}")
        speedup, memory = med["TRL"] / med["ours"], rss["TRL"] / rss["ours"]
        met = "met" if speedup >= 1.5 and memory >= 1 else "not met"
        verdicts.append(f"{which} {estimator}: speed-up {speedup:.2f}x (TRL step / ours), memory ratio {memory:.2f} "
                        f"(TRL peak RSS / ours): {met}")
        if "TRL +alloc" in med:
            alloc = "TRL +alloc"
            verdicts.append(f"{which} {estimator}: against TRL with rlhf's allocator settings: "
                            f"{med[alloc] / med['ours']:.2f}x, memory ratio {rss[alloc] / rss['ours']:.2f}")
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--estimators", nargs="+", default=["rloo", "grpo"], choices=["rloo", "grpo"])
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: tiny 8, smollm2 4)")
    ap.add_argument("--batch", type=int, default=0, help="responses per step (default: tiny 16, smollm2 8)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (TRL: num_generations)")
    ap.add_argument("--micro", type=int, default=0, help="micro-batch size (default: batch / 2)")
    ap.add_argument("--new-tokens", type=int, default=0, help="response length (default: tiny 32, smollm2 24)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per side, alternating (default: tiny 3, smollm2 2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=-1, help="OMP_NUM_THREADS for both sides (0: torch's default, "
                    "all cores; default: tiny 1, smollm2 0)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="run TRL with gradient checkpointing, as its config defaults (ours stays off)")
    ap.add_argument("--ours-gradient-checkpointing", action="store_true")
    ap.add_argument("--trl-allocator", action="store_true",
                    help="on a CPU, also run TRL with the allocator settings rlhf makes in-process")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        side, job_file, out_file = args.worker
        job = json.loads(Path(job_file).read_text())
        Path(out_file).write_text(json.dumps(worker_ours(job) if side == "ours" else worker_trl(job)))
        return

    import torch

    from rlhf.config import rlhf_home
    from rlhf.data import read_prompts
    from rlhf.models import pick_device, pick_dtype

    home = rlhf_home()
    device = pick_device(args.device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(pick_dtype(device, args.precision), "fp32")
    # One thread for the tiny model: it is all per-op overhead (see ppo_bench.py).
    defaults = {"tiny": dict(steps=8, batch=16, new_tokens=32, lr=1e-4, repeats=3, threads=1),
                "smollm2": dict(steps=4, batch=8, new_tokens=24, lr=1e-6, repeats=2, threads=0)}
    sides = [("ours", {}), ("TRL", {})]
    if args.trl_allocator and device.type == "cpu":
        sides.append(("TRL +alloc", ALLOCATOR_ENV))
    prompts = read_prompts("sentiment", split="train")
    rows = []
    for which in args.models:
        d = defaults[which]
        batch = args.batch or d["batch"]
        micro = args.micro or max(1, batch // 2)
        if batch % micro or batch % args.k or args.k < 2:
            sys.exit("--batch must be a multiple of --micro and of --k, and --k >= 2")
        repeats, threads = args.repeats or d["repeats"], (args.threads if args.threads >= 0 else d["threads"]) or None
        with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
            workdir = Path(tmp)
            policy, reward = prepare_models(which, workdir, home)
            prompts_file = workdir / "prompts.jsonl"
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            for estimator in args.estimators:
                job = dict(policy=policy, reward=reward, prompts_file=str(prompts_file), prompts=prompts,
                           estimator=estimator, k=args.k, steps=args.steps or d["steps"], batch=batch, micro=micro,
                           new_tokens=args.new_tokens or d["new_tokens"], lr=d["lr"], device=device.type,
                           precision=precision, ours_gc=args.ours_gradient_checkpointing,
                           trl_gc=args.trl_gradient_checkpointing)
                results: dict[str, list[dict]] = {side: [] for side, _ in sides}
                for r in range(repeats):
                    for i in range(len(sides)):  # rotate the order every repeat
                        side, env = sides[(i + r) % len(sides)]
                        result = run_worker(side, {**job, "output_dir": str(workdir / f"{estimator}-{r}-{i}")},
                                            workdir, threads, env)
                        results[side].append(result)
                        print(f"  {which} {estimator} run {r + 1}/{repeats} {side:<10} median step "
                              f"{result['median_step']:.3f} s, peak RSS {result['peak_rss_mb']:.0f} MB, generated "
                              f"{sorted(set(result['generated']))} tokens per call", flush=True)
                rows.append((which, estimator, job, threads or torch.get_num_threads(), results))

    verdicts = summarise(rows, device, precision)
    print("(speed-up = TRL step / ours; memory ratio = TRL peak RSS / ours, >= 1 means ours uses no more)")
    for line in verdicts:
        print(line)
    print("Target: ours >= 1.5x faster per step with memory ratio >= 1.")


if __name__ == "__main__":
    main()
