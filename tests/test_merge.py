"""merge_lora.py on the tiny model: the merged checkpoint predicts what base + adapter predicts
(forward path and predict_forward), reloads through common.sa2va.load_model, and a stage
checkpoint refuses a base model it was not trained on."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import merge_lora
from common.forward import forward_batch, full_size_logits
from common.lora import apply_lora, base_fingerprint, load_stage, save_stage, set_trainable
from common.sa2va import DEFAULT_ANSWER, DEFAULT_PROMPT, CheckpointError, Sa2VAProcessor, describe, load_model
from common.synth import make_video
from common.tiny import TinySa2VAChatModel, TinySa2VAConfig

PARTS = ["lora", "text_hidden_fcs", "mask_decoder"]


@pytest.fixture(scope="module")
def frames():
    images, _, _ = make_video(np.random.default_rng(3), 3, 96)
    return [Image.fromarray(i) for i in images]


@pytest.fixture(scope="module")
def other_base(tiny_folder, tmp_path_factory):
    """A second tiny model, built with another seed (untaught: only its weights matter here)."""
    _, tokenizer = load_model(tiny_folder)
    torch.manual_seed(1)
    model = TinySa2VAChatModel(TinySa2VAConfig(llm_config=dict(vocab_size=len(tokenizer))))
    out = str(tmp_path_factory.mktemp("other") / "tiny_seed1")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stage_ckpt(tiny_folder, tmp_path_factory):
    """A stage checkpoint of the tiny folder whose LoRA and heads visibly change the masks: the
    weights a training run would have moved are moved by a fixed random step instead."""
    model, _ = load_model(tiny_folder)
    apply_lora(model, 8, 16, dropout=0.0)
    set_trainable(model, PARTS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = str(tmp_path_factory.mktemp("stage") / "best")
    save_stage(model, out, PARTS, dict(stage="sft", base_model=tiny_folder, base_fingerprint=base_fingerprint(model),
                                       prompt=DEFAULT_PROMPT, answer=DEFAULT_ANSWER,
                                       args=dict(prompt=DEFAULT_PROMPT, answer=DEFAULT_ANSWER)))
    return out


@pytest.fixture(scope="module")
def merged(tiny_folder, stage_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("merged") / "tiny_vessel")
    info = merge_lora.main(merge_lora.parse_args(["--base_model", tiny_folder, "--lora_weights", stage_ckpt,
                                                  "--output_model", out, "--device", "cpu"]))
    return out, info


@torch.no_grad()
def logits_and_masks(model, tokenizer, frames):
    """Forward-path full-size logits and the released-style predict_forward masks."""
    model.eval()
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    batch = processor([dict(image=im, key=str(i)) for i, im in enumerate(frames)])
    logits = full_size_logits(model, forward_batch(model, batch)["low_res_logits"], batch["image_sizes"])
    predicted = [model.predict_forward(image=im, text=DEFAULT_PROMPT, tokenizer=tokenizer) for im in frames]
    return logits, predicted


def test_merged_equals_base_plus_adapter(tiny_folder, stage_ckpt, merged, frames):
    out, info = merged
    files = set(os.listdir(out))
    assert {"config.json", "merge_info.json", "model.safetensors", "tokenizer_config.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors", "trained_parts.safetensors"} & files
    assert info["lora_merged"] and info["mask_pixels_differing"] == 0

    base, tokenizer = load_model(tiny_folder)
    base_logits, _ = logits_and_masks(base, tokenizer, frames)
    load_stage(base, stage_ckpt)
    adapter_logits, adapter_pred = logits_and_masks(base, tokenizer, frames)
    model, merged_tokenizer = load_model(out)  # the merged folder reloads like any checkpoint
    assert not hasattr(model.language_model, "peft_config")  # LoRA is folded in, no adapter left
    merged_logits, merged_pred = logits_and_masks(model, merged_tokenizer, frames)

    # the adapter matters (else equality below proves nothing) ...
    assert max(float((a - b).abs().max()) for a, b in zip(base_logits, adapter_logits)) > 0.1
    # ... and the merged model reproduces it: forward path
    diff = max(float((a - m).abs().max()) for a, m in zip(adapter_logits, merged_logits))
    print(f"merged vs base + adapter: max |mask logit diff| {diff:.3g}")
    assert diff < 1e-4
    for a, m in zip(adapter_logits, merged_logits):
        assert torch.equal(a.sigmoid() > 0.5, m.sigmoid() > 0.5)
    # ... and the generate path (predict_forward: same answer, same masks)
    for a, m in zip(adapter_pred, merged_pred):
        assert a["prediction"] == m["prediction"] and "[SEG]" in a["prediction"]
        assert len(a["prediction_masks"]) == len(m["prediction_masks"]) >= 1
        for x, y in zip(a["prediction_masks"], m["prediction_masks"]):
            assert np.array_equal(x, y)


def test_stage_refuses_another_base(other_base, stage_ckpt, tmp_path):
    other, _ = load_model(other_base)
    with pytest.raises(CheckpointError, match="trained on base model .*tiny_sa2va.*pass the same --model"):
        load_stage(other, stage_ckpt)
    out = tmp_path / "never"
    with pytest.raises(CheckpointError, match="fingerprint"):
        merge_lora.main(merge_lora.parse_args(["--base_model", other_base, "--lora_weights", stage_ckpt,
                                               "--output_model", str(out), "--device", "cpu"]))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("merge_")]


def test_merge_refuses_bad_input(tiny_folder, stage_ckpt, merged, tmp_path):
    with pytest.raises(CheckpointError, match="not a stage checkpoint"):
        merge_lora.main(merge_lora.parse_args(["--base_model", tiny_folder, "--lora_weights", str(tmp_path),
                                               "--output_model", str(tmp_path / "x")]))
    with pytest.raises(SystemExit, match="exists"):
        merge_lora.main(merge_lora.parse_args(["--base_model", tiny_folder, "--lora_weights", stage_ckpt,
                                               "--output_model", merged[0]]))


def test_family_recognised_and_unknown_class_refused(tiny_folder, tmp_path):
    """A folder whose auto_map names Sa2VAChatModelQwen is the Qwen-VL family; a remote-code class
    of neither family is refused by name, before any remote code runs."""
    import json
    import shutil
    from common.sa2va import INTERNVL, QWENVL, folder_family
    qwen = dict(model_type="sa2va_chat", architectures=["Sa2VAChatModelQwen"],
                auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                          "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen"})
    assert folder_family(qwen) == QWENVL
    assert folder_family(dict(auto_map={"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"})) == INTERNVL
    folder = tmp_path / "Sa2VA-Other"
    shutil.copytree(tiny_folder, folder)
    config = dict(model_type="sa2va_chat", architectures=["Sa2VAChatModelOther"],
                  auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                            "AutoModel": "modeling_sa2va_other.Sa2VAChatModelOther"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="neither Sa2VAChatModel .* nor"):
        load_model(str(folder))
