"""Hardware choices, progress lines and run records shared by the recipes and the evaluator."""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from importlib import metadata

log = logging.getLogger("finesweep")


def setup_logging() -> None:
    # One plain line per event: reads well in `kubectl logs` and in a terminal. Under several processes only the
    # main one logs progress (INFO); the others log warnings and errors, tagged with their rank, so a failure on
    # any rank is in the log while each progress line appears once.
    procs = processes()
    tag = f"rank {procs.rank}/{procs.world_size} " if not procs.main else ""
    logging.basicConfig(level=logging.INFO if procs.main else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s %(levelname)s {tag}%(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "botocore", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Progress bars redraw with carriage returns, which turn into noise in `kubectl logs`; ours are lines.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class LaunchError(RuntimeError):
    """The trial cannot run as launched (e.g. its batch does not split over the process count): a configuration
    error, never retried."""


@dataclass(frozen=True)
class Processes:
    """This process's place among the trial's processes, as the launcher (torchrun / accelerate launch) set it in
    the environment before any process group exists. One process: rank 0 of 1."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes() -> Processes:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Processes(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                     int(env.get("LOCAL_WORLD_SIZE", str(world))))


def init_distributed(hw: "Hardware") -> None:
    """Start the process group before anything else needs it: the recipe agrees on one scratch folder, one
    checkpoint and one stop step through it before the Trainer exists. The Trainer's accelerate state (and
    DeepSpeed's comm layer) find it initialised and use it. A CPU-side gloo group rides along on GPUs so the small
    control messages (flags, paths) need no device tensors."""
    import datetime

    import torch
    import torch.distributed as dist

    procs = processes()
    if procs.world_size == 1 or dist.is_initialized():
        return
    kwargs: dict = {"timeout": datetime.timedelta(minutes=30)}  # TrainingArguments' ddp_timeout default
    if hw.device == "cuda":
        torch.cuda.set_device(procs.local_rank)
        kwargs.update(backend="cuda:nccl,cpu:gloo", device_id=torch.device("cuda", procs.local_rank))
    else:
        kwargs.update(backend="gloo")
    dist.init_process_group(**kwargs)


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Every rank waits here for the others (a no-op in a single process)."""
    if distributed():
        import torch.distributed as dist

        dist.barrier(group=_cpu_group())


def end_distributed() -> None:
    """Leave the process group together, after this rank is done (trained and saved, or checkpointed and
    stopping). Without it a rank that had nothing to save reached interpreter exit while the main process was
    still uploading, and tore the group down under a live peer: gloo aborted it ("terminate called without an
    active exception", SIGABRT) and the launcher failed a trial that had saved. So: every rank waits for the
    others here, then the group (and the CPU-side one) is destroyed while no rank is communicating."""
    global _CPU_GROUP
    if not distributed():
        return
    import torch.distributed as dist

    barrier()
    dist.destroy_process_group()
    _CPU_GROUP = None


def broadcast_from_main(value):
    """The main process's `value` on every rank (picklable; e.g. a scratch path, a checkpoint found or not)."""
    if not distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag: true on every rank when it is true on at least one (e.g. one rank got SIGTERM). One
    all-reduce for all the flags."""
    if not distributed():
        return tuple(bool(f) for f in flags)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return tuple(bool(v) for v in t.tolist())


def gather_to_all(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not distributed():
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_cpu_group())
    return out


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for control messages: the default group when it is gloo already (CPU), else a new one."""
    global _CPU_GROUP
    import torch.distributed as dist

    if _CPU_GROUP is None:
        backend = str(dist.get_backend())
        _CPU_GROUP = dist.group.WORLD if backend == "gloo" or "cpu:gloo" in backend else dist.new_group(backend="gloo")
    return _CPU_GROUP


def available_cpus() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup v2 CPU quota (a Kubernetes CPU limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def share_cpu_threads(hw: "Hardware") -> int:
    """Give each of this node's training processes its share of the CPUs for torch's intra-op threads (the
    launchers set OMP_NUM_THREADS=1, which would leave all but one core idle; N processes each using every core
    would oversubscribe them). Returns the thread count in use."""
    import torch

    procs = processes()
    if hw.device == "cpu" and procs.local_world_size > 1:
        torch.set_num_threads(max(1, available_cpus() // procs.local_world_size))
    return torch.get_num_threads()


@dataclass(frozen=True)
class Hardware:
    device: str  # cuda | cpu
    name: str
    precision: str  # fp16 | bf16 | fp32
    attn_implementation: str
    gpu_memory_gb: float
    num_gpus: int

    @property
    def dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]


def detect_hardware() -> Hardware:
    """T4 (sm75): fp16, SDPA (no bf16, no FlashAttention-2). Ampere and newer: bf16, FA2 when installed."""
    import torch

    if not torch.cuda.is_available():
        return Hardware("cpu", platform.processor() or "cpu", "fp32", "sdpa", 0.0, 0)
    major, _ = torch.cuda.get_device_capability(0)
    props = torch.cuda.get_device_properties(0)
    ampere = major >= 8
    attn = "sdpa"
    if ampere:
        try:
            import flash_attn  # noqa: F401  (only probing that it is installed)

            attn = "flash_attention_2"
        except ImportError:
            pass
    return Hardware("cuda", props.name, "bf16" if ampere else "fp16", attn, props.total_memory / 2**30,
                    torch.cuda.device_count())


def use_gradient_checkpointing(setting: str, hw: Hardware) -> bool:
    if setting in ("on", "off"):
        return setting == "on"
    # auto: only where memory is tight (16 GB T4 and smaller); it costs ~30% more compute.
    return hw.device == "cuda" and hw.gpu_memory_gb < 24


def peak_memory_gb(hw: Hardware) -> float:
    if hw.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "sacrebleu", "deepspeed"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_callback(label: str):
    """A TrainerCallback that logs step, loss, tokens/s and ETA at each logging step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        main_process_only = True  # Recipe.train registers it on the main process only: each line once

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()
            self.tokens0 = state.num_input_tokens_seen or 0
            log.info("%s: training %d steps (%s epochs)", label, state.max_steps, args.num_train_epochs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.time() - self.start
            step, total = state.global_step, max(state.max_steps, 1)
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            eta = elapsed / max(step, 1) * (total - step)
            extra = "".join(f" {k.split('/')[-1] if k.startswith('rewards/') else k} {v:.4g}"
                            for k, v in logs.items() if k in ("rewards/accuracies", "rewards/margins"))
            log.info("%s: step %d/%d (%.0f%%) loss %.4f lr %.2e tok/s %.0f elapsed %s eta %s%s",
                     label, step, total, 100 * step / total, logs["loss"], logs.get("learning_rate", 0.0),
                     tokens / max(elapsed, 1e-9), fmt_duration(elapsed), fmt_duration(eta), extra)

    return Progress()
