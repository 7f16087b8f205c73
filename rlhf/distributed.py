"""What a run needs beyond plain data parallel when its weights are sharded over processes (FSDP, DeepSpeed ZeRO-3).

accelerate's launch config decides the wrapping; this module holds the few things accelerate leaves to us: FSDP and
DeepSpeed on CPU processes (accelerate drops them there: `honour_launch_on_cpu`), whether the weights are sharded
(then saving gathers them: rlhf.trl_stage.save_trained, rlhf.ppo.save_policy), and a run's layout for metrics.json.
The README's "Many GPUs and many machines" says what ran where.
"""

from __future__ import annotations

import contextlib
import os

from rlhf.config import UserError


def honour_launch_on_cpu(mixed_precision: str, deepspeed_plugin=None) -> bool:
    """Under an FSDP or DeepSpeed launch config on CPU processes, set up accelerate's state as it does on GPUs: FSDP
    or DeepSpeed with the launcher's plugin (its FSDP_* or ACCELERATE_DEEPSPEED_* variables), in `mixed_precision`
    (no, bf16, fp16). Call it before the Accelerator is made (for a Trainer: after its TrainingArguments, which reset
    accelerate's state).

    accelerate 1.16 turns these configs into FSDP or DeepSpeed only off the CPU. With `cpu=True` (gloo) it sets up
    plain data parallel (MULTI_CPU) and drops the plugin without a word, so the configs ran as DDP on a CPU; with
    `cpu=False` on a machine without GPUs, DeepSpeed runs but accelerate counts one process and takes every process
    for the main one. torch's FSDP2 and DeepSpeed's CPU accelerator both train over gloo, which is how CI tests them.

    deepspeed_plugin: a Trainer's own (its TrainingArguments make one under a DeepSpeed launch, holding the "auto"
    batch sizes it fills in); used in place of a new one. A Trainer must then be given none (accelerate refuses a
    plugin for a second Accelerator) and takes it from the state. Returns whether the state holds that plugin.
    No-op without such a config, or off the CPU."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not (fsdp or deepspeed):
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, TorchDynamoPlugin

    if not PartialState._shared_state:
        PartialState(cpu=True)
    if PartialState().distributed_type != DistributedType.MULTI_CPU:
        return False  # on GPUs accelerate does it; a single unlaunched process has nothing to shard over
    state = AcceleratorState(mixed_precision=mixed_precision, cpu=True, dynamo_plugin=TorchDynamoPlugin(),
                             _from_accelerator=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False  # already set up (an earlier stage in this process)
    # What AcceleratorState.__init__ does for these launches on GPUs (accelerate/state.py), on the CPU.
    if deepspeed:
        _deepspeed_on_cpu(state, mixed_precision, deepspeed_plugin)
        kind = DistributedType.DEEPSPEED
    else:
        from accelerate.utils import FullyShardedDataParallelPlugin

        if os.environ.get("FSDP_VERSION", "1") == "1" and os.environ.get("FSDP_SYNC_MODULE_STATES") == "true":
            raise UserError("FSDP1 with sync_module_states (configs/accelerate/fsdp.yaml) does not run on CPU "
                            "processes, accelerate refuses it there: use configs/accelerate/fsdp2.yaml")
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        state.fsdp_plugin = plugin
        kind = DistributedType.FSDP
    state.distributed_type = PartialState._shared_state["distributed_type"] = kind
    return deepspeed and deepspeed_plugin is not None


def _deepspeed_on_cpu(state, mixed_precision: str, plugin=None) -> None:
    try:
        from deepspeed import comm
    except ImportError:
        raise UserError("a DeepSpeed launch config needs DeepSpeed: pip install deepspeed") from None
    from accelerate.utils import DeepSpeedPlugin

    if not comm.is_initialized():  # on the process group accelerate made (gloo)
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    if plugin is None:
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state._mixed_precision = "no"  # DeepSpeed's own config holds the precision (accelerate does the same)


@contextlib.contextmanager
def loading_whole(accelerator):
    """Models loaded inside are whole on every process, also under ZeRO-3, for the frozen ones a process runs by
    itself (PPO's reference and reward model, a stage's saved model reloaded for its figures). accelerate's ZeRO-3
    plugin registers its config with transformers whatever zero3_init_flag says, and from_pretrained then partitions
    every model it loads (deepspeed.zero.Init), which works only inside a DeepSpeed engine."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def weights_sharded(accelerator) -> bool:
    """True under FSDP and DeepSpeed ZeRO-3, where no process holds the whole model outside a forward pass."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def describe(accelerator) -> dict:
    """How a run was spread, for metrics.json: accelerate's distributed type, the number of processes, and the FSDP
    version or ZeRO stage. Written by every stage, so a run says whether its weights were sharded at all."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    out = {"type": str(kind.value if hasattr(kind, "value") else kind), "processes": accelerator.num_processes}
    if kind == DistributedType.FSDP:
        out["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
    elif kind == DistributedType.DEEPSPEED:
        out["zero_stage"] = accelerator.state.deepspeed_plugin.zero_stage
    return out
