"""DeepSpeed ZeRO inside one member: the config is generated here from the train config, in one place.

ZeRO shards the optimizer state (stage 1), gradients (2) and parameters (3) of one member over its Ray Train
workers (docs/ARCHITECTURE.md, "members are independent members"). On CPU the client optimizer is torch AdamW
(DeepSpeed's own CPU/fused Adam compile a C++ op for about a minute); on GPU the member trains in bf16 with fp32
master weights.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rayblora.config import TrainConfig

CHECKPOINT_TAG = "deepspeed"


def deepspeed_config(cfg: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a member: micro-batch, accumulation, ZeRO stage and offload, precision."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1 and cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.zero_stage == 3 and cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(use_gpu)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _skip_shm_build() -> None:
    """DeepSpeed compiles a shared-memory comm op on first import on CPU (~40 s); gloo does not need it."""
    import deepspeed.comm.torch  # noqa: F401  deferred: only strategy=deepspeed members import DeepSpeed

    module = sys.modules["deepspeed.comm.torch"]
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def ensure_process_group(use_gpu: bool) -> None:
    """Join the torch.distributed group Ray Train set up, or start a 1-process group (tests, CLI runs)."""
    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if use_gpu else "gloo")


class DeepSpeedStepper:
    """Optimizer mechanics of a member trained by a DeepSpeed engine (same interface as `TorchStepper`)."""

    def __init__(self, scorer, optimizer, scheduler, cfg: TrainConfig, use_gpu: bool):
        _skip_shm_build()
        import deepspeed  # deferred: seconds to import, and only strategy=deepspeed members need it

        ensure_process_group(use_gpu)
        params = [p for _, p in scorer.lora_parameters()]
        self.engine, _, _, _ = deepspeed.initialize(
            model=scorer.model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params,
            config=deepspeed_config(cfg, use_gpu), dist_init_required=False)
        scorer.device = self.engine.device  # the engine moved the model there (bf16 on GPU)
        self.params = params
        self.scorer = scorer

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; the engine scales by 1/grad_accum and steps at the boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> None:
        """Nothing left to do: the engine stepped at the accumulation boundary."""

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        """Empty: optimizer and schedule state live in the engine checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to load: see :meth:`load`."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """LoRA tensors gathered from their ZeRO-3 partitions (a collective: every rank must call it)."""
        import deepspeed  # deferred, as in __init__ (already loaded here)

        with deepspeed.zero.GatheredParameters(self.params, enabled=self.engine.zero_optimization_stage() == 3):
            return self.scorer.adapter_state()

    def save(self, directory: Path) -> None:
        """Engine checkpoint (optimizer shards + LoRA weights, frozen base excluded); every rank calls it."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> bool:
        """Restore the engine checkpoint; True when it also restored the LoRA weights."""
        if not (Path(directory) / CHECKPOINT_TAG).exists():
            return False
        self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False)
        return True
