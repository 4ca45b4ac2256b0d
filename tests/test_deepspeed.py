"""DeepSpeed ZeRO inside one member: 2 Ray Train workers x ZeRO-2 / ZeRO-3 follow plain DDP's loss curve, and
the gathered adapter is a PEFT folder. Plus the generated DeepSpeed config."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import tiny_overrides
from rayblora.config import load_config
from rayblora.train.deepspeed import deepspeed_config


def test_generated_config_follows_the_train_config():
    cfg = load_config(None, ["train.strategy=deepspeed", "train.zero_stage=3", "train.grad_accum=4",
                             "train.batch_size=2", "train.offload_optimizer=true", "train.offload_params=true"])
    ds = deepspeed_config(cfg.train, use_gpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed_config(cfg.train, use_gpu=False)["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="train.offload_params"):
        load_config(None, ["train.zero_stage=2", "train.offload_params=true"])


def _loss_curve(cfg, tag: str):
    from rayblora.workflows.coordinator import member_trainer

    result = member_trainer(cfg, 0, tag).fit()
    history = sorted((m["step"], m["train_loss"]) for _, m in result.best_checkpoints)
    with result.checkpoint.as_directory() as d:
        from pathlib import Path

        from peft import PeftModel

        from rayblora.model import load_base_model

        peft_dir = Path(d).parent / f"peft-{tag}"
        _save_as_peft(cfg, Path(d), peft_dir)
        base, _ = load_base_model(cfg.model)
        PeftModel.from_pretrained(base, str(peft_dir))
    return [loss for _, loss in history]


def _save_as_peft(cfg, checkpoint_dir, out_dir):
    from safetensors.torch import load_file

    from rayblora.model import add_lora, load_base_model, set_lora_state
    from rayblora.train.checkpoint import ADAPTER

    model, _ = load_base_model(cfg.model)
    peft_model = add_lora(model, cfg.adapter, seed=0)
    set_lora_state(peft_model, load_file(str(checkpoint_dir / ADAPTER)))
    peft_model.save_pretrained(str(out_dir))


@pytest.mark.slow
def test_zero2_and_zero3_follow_ddp_on_two_workers(ray_session, sentiment_files, tmp_path):
    def cfg_for(name, **extra):
        return load_config(None, tiny_overrides(sentiment_files, tmp_path / name, **{
            "train.steps": "4", "train.checkpoint_every": "1", "cluster.workers_per_member": "2",
            "cluster.cpus_per_worker": "0.5", "cluster.max_failures": "0", **extra}))

    configs = {"ddp": cfg_for("ddp"),
               "zero2": cfg_for("zero2", **{"train.strategy": "deepspeed", "train.zero_stage": "2"}),
               "zero3": cfg_for("zero3", **{"train.strategy": "deepspeed", "train.zero_stage": "3"})}
    with ThreadPoolExecutor(3) as pool:
        curves = dict(zip(configs, pool.map(lambda kv: _loss_curve(kv[1], kv[0]), configs.items())))
    assert len(curves["ddp"]) == 4
    for name in ("zero2", "zero3"):
        assert curves[name] == pytest.approx(curves["ddp"], abs=1e-4), name
