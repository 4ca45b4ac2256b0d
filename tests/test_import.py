"""`rayblora import`: LoRA adapters trained by a plain PEFT + torch loop, outside rayblora, become an artifact that
predicts what PEFT's own PeftModel predicts, takes a post-hoc family, and is refused with a named reason when it
cannot be used."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import tiny_overrides
from rayblora.artifact import load_posterior
from rayblora.config import ModelConfig, load_config
from rayblora.data import load_task_data
from rayblora.model import ModelError, answer_token_ids, load_base_model
from rayblora.posteriors import get_posterior_class
from rayblora.workflows.importing import BASE_RECORD, export_members, import_adapters
from rayblora.manifest import open_artifact

ROOT = Path(__file__).resolve().parents[1]


def peft_trained_adapter(folder: Path, texts: list[str], seed: int, **lora) -> Path:
    """A LoRA trained by PEFT and torch alone (a few next-token steps), saved by PEFT's `save_pretrained`."""
    torch.manual_seed(seed)
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"))
    model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                               **lora}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model.train()
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def peft_probs(folder: Path, prompts: list[str], choices: list[str]) -> torch.Tensor:
    """PEFT's own answer distribution: PeftModel.from_pretrained, one unpadded prompt at a time."""
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"))
    model = PeftModel.from_pretrained(base, folder).eval()
    ids = answer_token_ids(tokenizer, choices)
    with torch.no_grad():
        rows = [model(**tokenizer(p, return_tensors="pt")).logits[0, -1, ids] for p in prompts]
    return torch.softmax(torch.stack(rows), -1)


@pytest.fixture(scope="module")
def setting(sentiment_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    cfg = load_config(None, tiny_overrides(sentiment_files, root / "run"))
    data = load_task_data(cfg.data)
    texts = list(data.train["prompt"][:32])
    folders = [peft_trained_adapter(root / "a", texts, 0),
               peft_trained_adapter(root / "b", texts, 1, r=2, lora_alpha=2, use_rslora=True,
                                    target_modules=["q_proj", "o_proj"], layers_to_transform=[1])]
    return cfg, data, folders, root


def test_imported_adapters_predict_what_peft_predicts_and_take_a_post_hoc_family(setting, tmp_path):
    cfg, data, folders, _ = setting
    path = import_adapters(folders, cfg, tmp_path, log=lambda _m: None)
    posterior = load_posterior(path)
    assert posterior.method == "ensemble" and len(posterior.members) == 2
    prompts = list(data.test["prompt"][:12])
    ours = posterior.predict(prompts).sample_probs  # both members in one batched forward
    for k, folder in enumerate(folders):
        torch.testing.assert_close(ours[k], peft_probs(folder, prompts, list(data.spec.choices)), rtol=0, atol=1e-5)
    tfb = get_posterior_class("tfb_ensemble").build(posterior.scorer, posterior.members, posterior.member_info,
                                                    data=data, config=cfg)
    assert tfb.predict(prompts).probs.shape == (12, 2)
    single = load_posterior(import_adapters(folders[:1], cfg, tmp_path / "one", log=lambda _m: None))
    assert single.method == "map"


def _broken(folder: Path, tmp: Path, edit) -> Path:
    copy = tmp / f"{folder.name}-broken"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def _edit_config(**values):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**meta, **values}))
    return edit


def _pickle_only(folder: Path) -> None:
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


@pytest.mark.parametrize("edit, message", [
    (_edit_config(base_model_name_or_path="meta-llama/Llama-3.1-8B"), "trained on base model 'meta-llama"),
    (_pickle_only, "adapter_model.bin is a pickle and is never loaded"),
    (_edit_config(r=8), "tensors disagree with r=8"),
    (_edit_config(use_dora=True), "DoRA is not supported"),
], ids=["other base", "bin", "rank", "dora"])
def test_unusable_adapters_are_refused_naming_the_problem(setting, tmp_path, edit, message):
    cfg, _, folders, _ = setting
    with pytest.raises(ModelError, match=message):
        import_adapters([_broken(folders[0], tmp_path, edit)], cfg, tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out" / "posterior").exists()


def test_adapters_of_another_base_are_refused_by_their_modules_and_shapes(setting, tmp_path):
    cfg, _, folders, _ = setting
    missing = _broken(folders[0], tmp_path, _edit_config(target_modules=["nonexistent_proj"]))
    from safetensors.torch import load_file, save_file
    state = load_file(str(missing / "adapter_model.safetensors"))
    save_file({k.replace("q_proj", "nonexistent_proj"): v for k, v in state.items()},
              str(missing / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="nonexistent_proj"):
        import_adapters([missing], cfg, tmp_path / "out", log=lambda _m: None)
    wider = load_config(None, [*tiny_overrides({"train": cfg.data.task, "shift": cfg.data.shift_tasks[0]},
                                               tmp_path), "model.tiny_hidden=96"])
    with pytest.raises(ModelError, match="does not fit the base model"):
        import_adapters([folders[0]], wider, tmp_path / "out", log=lambda _m: None)


def test_import_command_writes_the_artifact_and_reports_a_bad_folder_in_one_line(setting, tmp_path):
    """The command in this process, then a bad folder through a `rayblora` process of its own."""
    from rayblora.cli import main
    from rayblora.config import dump_config

    cfg, _, folders, root = setting
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    argv = ["import", "--adapter", str(folders[0]), "--adapter", str(folders[1]), "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "posterior" / "manifest.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "rayblora.cli", "import", "--adapter", str(root / "nowhere"),
                          "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def trained_artifact(sentiment_files, tmp_path_factory):
    from rayblora.workflows.train import train

    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, tiny_overrides(sentiment_files, root / "run", **{
        "adapter.layers": "[1]", "train.eval_every": "0", "laplace.fit_batches": "3", "laplace.link_samples": "10",
        "laplace.prior_method": "fixed", "laplace.prior_precision": "1e-3"}))
    return cfg, train(cfg, log=lambda _m: None, in_process=True)


def test_exported_members_load_in_peft_and_round_trip_to_the_same_laplace_predictions(trained_artifact, tmp_path):
    from rayblora.workflows.evaluate import evaluate_methods
    from rayblora.workflows.fit import fit_posterior

    cfg, artifact = trained_artifact
    folders = export_members(artifact, tmp_path / "peft", log=lambda _m: None)
    original = load_posterior(artifact)
    assert len(folders) == 2 and all((f / BASE_RECORD).is_file() for f in folders)
    data = load_task_data(cfg.data)
    prompts = list(data.test["prompt"][:8])
    for k, folder in enumerate(folders):  # PEFT's own loader reads an exported folder as the member it was
        torch.testing.assert_close(peft_probs(folder, prompts, list(data.spec.choices)),
                                   original.predict(prompts).sample_probs[k], rtol=0, atol=1e-5)
    reimported = import_adapters(folders, cfg, tmp_path / "back", log=lambda _m: None)
    quiet = {"log": lambda _m: None}
    fitted = [fit_posterior(a, cfg, tmp_path / name, method="laplace_ensemble", **quiet)
              for a, name in ((artifact, "fit-original"), (reimported, "fit-reimported"))]
    tables = [evaluate_methods(open_artifact(path), cfg, methods=["ensemble", "laplace_ensemble"], **quiet)
              for path in fitted]
    # a weak prior (λ = 1e-3) makes the Laplace rows far from the ensemble's (0.16 here), so the comparison sees
    # a reparametrised adapter (B scaled, alpha = r: 0.02 apart), not only the members
    assert abs(tables[0]["laplace_ensemble"]["train"].probs - tables[0]["ensemble"]["train"].probs).max() > 1e-2
    for method, splits in tables[0].items():
        for split, result in splits.items():
            assert abs(result.probs - tables[1][method][split].probs).max() <= 1e-5, (method, split)


def test_an_exported_member_is_refused_on_a_base_of_the_same_name_with_other_weights(trained_artifact, tmp_path):
    cfg, artifact = trained_artifact
    folder = export_members(artifact, tmp_path / "peft", log=lambda _m: None)[0]
    record = json.loads((folder / BASE_RECORD).read_text())
    (folder / BASE_RECORD).write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    with pytest.raises(ModelError, match="fingerprint 000000000000"):
        import_adapters([folder], cfg, tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out" / "posterior").exists()
    with pytest.raises(ModelError, match="exists and is not empty"):
        export_members(artifact, tmp_path / "peft", log=lambda _m: None)
