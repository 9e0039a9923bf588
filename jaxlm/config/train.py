"""`mesh.*`, `optim.*`, `train.*` and `distributed.*`: how a run trains, on what devices."""
from __future__ import annotations

import dataclasses

from jaxlm.config.schema import check


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # pipeline parallelism: the layer stack split into this many contiguous stages, the batch into
    # train.microbatches that flow through them (jaxlm.model.pipeline); 1: no pipeline
    stage: int = 1
    # the pipeline's schedule: 1 GPipe; r > 1 circular (each stage holds r chunks of the layers and each
    # microbatch goes round the stages r times: bubble (stage - 1) / (r x microbatches + stage - 1))
    repeats: int = 1
    data: int = 1  # replicas: the batch (zero1/zero2: and the optimizer state) is split over data x fsdp
    # params, gradients and optimizer state sharded over it (fsdp = zero3 rules; zero1/zero2: see rules);
    # -1: the rest of the devices
    fsdp: int = -1
    # context parallelism: activations split along the sequence over it, attention all-gathers the
    # keys and values (jaxlm.model.context_parallel); must divide train.seq_len
    sequence: int = 1
    tensor: int = 1  # heads and the MLP's hidden units split over it (fsdp_tp rules)
    # dp | fsdp | fsdp_tp | zero1 | zero2 | zero3: which logical axes map to which mesh axes
    # (jaxlm.sharding.RULES); zero1/zero2: params replicated as dp, the optimizer state (zero2: and the
    # gradients) split over data x fsdp; zero3 = fsdp
    rules: str = "fsdp"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adafactor
    lr: float = 3e-4  # peak learning rate
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # decoupled (AdamW); norms and biases are not decayed
    # linear warmup from 0 to lr, in optimizer steps (ppo: train.steps x ppo.epochs x ppo.minibatches);
    # longer than the run (a shortened smoke run): the rate rises all along, and the run says so
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | inverse_sqrt | constant
    final_lr_fraction: float = 0.1  # the decay ends at this fraction of lr
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps (ppo: iterations)
    batch_size: int = 16  # global sequences per optimizer step
    seq_len: int = 256  # tokens per sequence (<= model.max_seq_len)
    grad_accum_steps: int = 1  # micro-batches per step: batch_size / this at a time
    # pipeline microbatches per accumulation step (mesh.stage > 1): each carries batch_size /
    # grad_accum_steps / this rows through the stages; 0: 2 x mesh.stage (bubble (S - 1) / (3S - 1) for GPipe)
    microbatches: int = 0
    batch_ramp_start: int = 0  # 0: no ramp; else the global batch at step 0
    batch_ramp_tokens: int = 0  # tokens over which the batch grows linearly to batch_size
    run_dir: str = "runs/default"  # config.yaml, checkpoints/, metrics.jsonl, TensorBoard events
    seed: int = 0  # parameter initialisation and sampling
    init_from: str = ""  # another run's directory: start from its latest params
    log_every: int = 10  # steps per metrics row (and progress-bar update)
    eval_every: int = 100  # steps between held-out evaluations (and one at the end)
    eval_batches: int = 4  # held-out batches per evaluation; 0: no held-out evaluation
    save_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the newest this many are kept
    async_checkpoint: bool = True  # write checkpoints in the background while training goes on
    spike_factor: float = 0.0  # 0 disables; else restore when loss > factor * running mean
    max_bad_steps: int = 3  # consecutive non-finite or spiking steps before a restore
    max_restores_per_step: int = 2  # restores of one checkpoint before the run stops as diverged
    max_restores: int = 10  # restores in all (a run's every session) before the run stops
    progress: bool = True  # console lines: a start banner, a progress bar (plain lines into a file), held-out losses
    # also log every metrics row to this Weights & Biases project ("": off); needs `pip install wandb`
    # and `wandb login`, or WANDB_MODE=offline to keep the run on disk (RUN_DIR/wandb, `wandb sync`)
    wandb_project: str = ""
    peak_tflops: float = 0.0  # device peak for MFU; 0: a large matmul, measured once per machine (~/.cache/jaxlm)
    # device memory bandwidth for the decode bound of `jaxlm bench`; 0: measured (jaxlm.perf)
    peak_bandwidth_gbs: float = 0.0
    loss_chunk: int = 0  # > 0: output projection + cross-entropy this many positions at a time


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs. Which process this is comes from the environment (jaxlm/distributed.py)."""

    init_timeout_s: int = 300  # wait this long for every process to join
    heartbeat_timeout_s: int = 100  # JAX's coordination service: a process silent this long is dead
    # jaxlm's own watch during training: a process whose heartbeat file (RUN_DIR/.peers) stops
    # changing this long is dead, and the others exit at once with one line
    peer_timeout_s: int = 15
    shutdown_timeout_s: int = 300  # at a clean exit, wait this long for the others to finish


CHOICES = {
    "mesh.rules": ("dp", "fsdp", "fsdp_tp", "zero1", "zero2", "zero3"),
    "optim.name": ("adamw", "adafactor"),
    "optim.decay": ("cosine", "linear", "inverse_sqrt", "constant"),
}


def validate_mesh(mesh: MeshConfig) -> None:
    for key in ("data", "fsdp", "tensor"):
        v = getattr(mesh, key)
        check(v == -1 or v >= 1, f"mesh.{key}={v} must be >= 1, or -1 for the rest of the devices")
    check([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1,
          "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    check(mesh.sequence >= 1, f"mesh.sequence={mesh.sequence} must be >= 1 (1: the sequence is not split)")
    check(mesh.stage >= 1, f"mesh.stage={mesh.stage} must be >= 1 (1: no pipeline)")
    check(mesh.repeats >= 1, f"mesh.repeats={mesh.repeats} must be >= 1 (1: GPipe)")


def validate_train(t: TrainConfig) -> None:
    for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                "save_every", "keep_checkpoints", "max_bad_steps", "max_restores_per_step", "max_restores"):
        check(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be positive")
    check(t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} must be >= 0")
    for key in ("peak_tflops", "peak_bandwidth_gbs"):
        check(getattr(t, key) >= 0, f"train.{key}={getattr(t, key)} must be >= 0 (0: measured)")
    check(t.loss_chunk >= 0 and (t.loss_chunk == 0 or t.seq_len % min(t.loss_chunk, t.seq_len) == 0),
          f"train.loss_chunk={t.loss_chunk} must be 0 (off) or divide train.seq_len={t.seq_len}")
    check(t.batch_size % t.grad_accum_steps == 0,
          f"train.grad_accum_steps={t.grad_accum_steps} must divide train.batch_size={t.batch_size}")
    check(0 <= t.batch_ramp_start <= t.batch_size,
          f"train.batch_ramp_start={t.batch_ramp_start} must be in [0, train.batch_size={t.batch_size}]")
    check(t.batch_ramp_tokens >= 0, f"train.batch_ramp_tokens={t.batch_ramp_tokens} must be >= 0")
    check(t.spike_factor == 0 or t.spike_factor > 1,
          f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1")


def validate_optim(o: OptimConfig) -> None:
    check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(0 <= o.final_lr_fraction <= 1, f"optim.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1}, optim.b2={o.b2} must be in [0, 1)")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0 (0 disables)")


def validate_distributed(d: DistributedConfig) -> None:
    for key in ("init_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s", "peer_timeout_s"):
        v = getattr(d, key)
        check(v > 0, f"distributed.{key}={v} must be positive (seconds)")
