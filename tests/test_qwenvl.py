"""The Qwen-VL family (`Sa2VAChatModelQwen`) on its tiny stand-in (`--model tiny-qwenvl`: a real
Qwen3VLForConditionalGeneration at a tiny config + the tiny SAM2): inputs as predict_forward
builds them, forward-path mask == predict_forward mask, the pinned [SEG] state convention, LoRA on
the text layers only, SFT learns, merge == base + adapter, and every script takes the model."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import merge_lora
from common import qwenvl
from common.data import VesselDataset, build_splits
from common.forward import forward_batch, full_size_logits, llm_forward
from common.lora import apply_lora, load_stage, save_stage, set_trainable
from common.sa2va import (DEFAULT_PROMPT, QWENVL, CheckpointError, Sa2VAProcessor, describe, family, load_model,
                          predict)
from common.tiny_qwenvl import build_tiny_qwenvl, save_tiny_qwenvl

QUICK_SFT = ["--model", "tiny-qwenvl", "--epochs", "6", "--lr", "3e-3", "--batch_size", "4", "--num_workers", "0",
             "--lora_preset", "small", "--log_every", "100"]
SMALL = ["--max_train_samples", "16", "--max_val_samples", "8", "--num_workers", "0"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-qwenvl")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tiny-qwenvl written as a folder (weights + processor), as `python -m common.tiny_qwenvl` does."""
    model, _ = build_tiny_qwenvl(0)
    out = str(tmp_path_factory.mktemp("tiny_qwenvl") / "tiny_qwenvl")
    save_tiny_qwenvl(model, out)
    return out


@pytest.fixture(scope="module")
def sft_run(synth_data, tmp_path_factory):
    import train_sft
    args = train_sft.parse_args(["--data", synth_data, "--output", str(tmp_path_factory.mktemp("qruns"))] + QUICK_SFT)
    return train_sft.main(args)


def samples(synth_data, n=3):
    train, _ = build_splits(synth_data)
    items = [VesselDataset(train)[i] for i in range(n)]
    if n > 2:  # a non-square frame: another 28 px grid and patch count
        items[2] = dict(items[2], image=items[2]["image"].resize((160, 96)), mask=None)
    return items


def test_inputs_are_predict_forwards(tiny, synth_data):
    """The processor call of predict_forward (qwen_vl_utils resize, min_pixels/max_pixels call
    arguments) and ours (fetch_image, size=) give the same tokens, patches and grid; and with the
    released class's bounds a 224 px image is a 40 x 40 patch grid on Qwen3-VL (FACTS.md)."""
    model, processor = tiny  # load_model gives the Qwen-VL family's processor
    for s in samples(synth_data):
        ours = qwenvl.encode(processor, s["image"], DEFAULT_PROMPT, "It is [SEG].", model.min_pixels, model.max_pixels)
        text = qwenvl.chat_text(processor, s["image"], DEFAULT_PROMPT)
        assert text.endswith("<|im_start|>assistant\n") and "<image>" not in text
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            released = processor(text=[text], images=[qwenvl.fetch_image(s["image"])], videos=None, padding=True,
                                 return_tensors="pt", min_pixels=model.min_pixels, max_pixels=model.max_pixels)
        assert ours["prompt_ids"] == released["input_ids"][0].tolist()
        assert torch.equal(ours["pixel_values"], released["pixel_values"])
        assert torch.equal(ours["image_grid_thw"], released["image_grid_thw"])
    assert qwenvl.fetch_image(Image.new("RGB", (130, 100))).size == (140, 112)  # the 28 px grid
    big = qwenvl.processor_inputs(processor, Image.new("RGB", (224, 224)), DEFAULT_PROMPT,
                                  qwenvl.RELEASED_MIN_PIXELS, qwenvl.RELEASED_MAX_PIXELS)
    assert big["image_grid_thw"].tolist() == [[1, 40, 40]]


def test_forward_path_mask_equals_predict_forward(tiny, synth_data):
    model, tokenizer = tiny
    assert family(model) is QWENVL and qwenvl.seg_convention(model) == "post_norm"
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    for sample in samples(synth_data):
        released = predict(model, tokenizer, sample["image"], DEFAULT_PROMPT)
        assert released["prediction"].startswith("It is [SEG].")  # the same answer text
        with torch.no_grad():
            batch = processor([sample])
            logits = full_size_logits(model, forward_batch(model, batch)["low_res_logits"], batch["image_sizes"])[0]
        ours = (logits.sigmoid() > 0.5).numpy()
        assert ours.shape == sample["image"].size[::-1]
        assert 0 < ours.sum() < ours.size  # a mask, not a blank: equality below means something
        np.testing.assert_array_equal(ours, released["prediction_masks"][0][0])


def test_batch_equals_single(tiny, synth_data):
    """Right padding, different image grids, M-RoPE positions: each sample as if alone."""
    model, tokenizer = tiny
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer)
    items = samples(synth_data)
    with torch.no_grad():
        together = forward_batch(model, processor(items))["low_res_logits"]
        alone = torch.cat([forward_batch(model, processor([s]))["low_res_logits"] for s in items])
    assert len({processor([s])["input_ids"].shape[1] for s in items}) > 1
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_seg_hidden_state_convention_is_pinned(tiny, synth_data, tmp_path):
    """`pre_norm` is the last decoder layer's output, `post_norm` the final RMSNorm of it (what
    hidden_states[-1] is on transformers 5); which one a checkpoint uses comes from its config,
    and a stage checkpoint refuses a model that reads the other one."""
    model, tokenizer = tiny
    batch = Sa2VAProcessor(describe(model, tokenizer), tokenizer)([samples(synth_data, 1)[0]])
    captured = {}
    layers = qwenvl.decoder_layers(model)
    hook = layers[-1].register_forward_hook(lambda m, a, out: captured.update(x=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            post, _ = llm_forward(model, batch)
            model.config.seg_hidden_state = "pre_norm"
            pre, _ = llm_forward(model, batch)
            full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                               mm_token_type_ids=batch["mm_token_type_ids"], output_hidden_states=True)
    finally:
        hook.remove()
        model.config.seg_hidden_state = "post_norm"
    seg = int(batch["seg_index"][0])
    torch.testing.assert_close(pre[0], captured["x"][0, seg])
    norm = qwenvl.unwrap(model.model).model.language_model.norm
    torch.testing.assert_close(post[0], norm(captured["x"])[0, seg], atol=1e-6, rtol=1e-5)
    assert (pre - post).abs().max() > 1e-2  # the two conventions are far apart
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        torch.testing.assert_close(post[0], full.hidden_states[-1][0, seg], atol=1e-6, rtol=1e-5)

    rule = qwenvl.seg_hidden_convention
    assert rule(dict(transformers_version="4.57.1"), "Qwen3VLForConditionalGeneration") == "pre_norm"
    assert rule(dict(transformers_version="5.17.0"), "Qwen3VLForConditionalGeneration") == "post_norm"
    assert rule(dict(transformers_version="4.57.1"), "Qwen2_5_VLForConditionalGeneration") == "post_norm"
    assert rule(dict(transformers_version="4.57.1", seg_hidden_state="post_norm"),
                "Qwen3VLForConditionalGeneration") == "post_norm"

    stage = str(tmp_path / "stage")
    save_stage(model, stage, ["text_hidden_fcs"], dict(stage="test"))
    assert json.load(open(os.path.join(stage, "stage.json")))["seg_hidden_state"] == "post_norm"
    other, _ = load_model("tiny-qwenvl")
    other.config.seg_hidden_state = "pre_norm"
    with pytest.raises(CheckpointError, match="pre_norm|post_norm"):
        load_stage(other, stage)


@pytest.mark.parametrize("vl", ["qwen3_vl", "qwen2_5_vl"])
def test_lora_adapts_text_layers_only(vl):
    """Attention + MLP presets adapt every text layer and no vision block (Qwen2.5-VL's vision MLP
    uses the same gate/up/down_proj names); set_trainable leaves the vision tower frozen."""
    model, _ = build_tiny_qwenvl(0, vl, teach=False)
    apply_lora(model, 4, 8, include_mlp=True)
    set_trainable(model, ["lora", "text_hidden_fcs", "mask_decoder"])
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 2 * 7 and all(".language_model.layers." in n for n in adapted)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("text_hidden_fcs."))


def test_sft_moves_lora_heads_decoder_and_raises_dice(sft_run):
    base, _ = load_model("tiny-qwenvl")
    tuned, _ = load_model("tiny-qwenvl")
    load_stage(tuned, os.path.join(sft_run, "final"))
    base_params = dict(base.named_parameters())
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 4 and all(p.abs().max() > 0 for p in lora_b)  # q,k,v,o of 2 layers; B starts at 0
    moved = {"text_hidden_fcs.": False, "grounding_encoder.sam2_model.sam_mask_decoder.": False}
    for name, p in tuned.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("model.base_model.model.", "model.").replace(".base_layer", "")
        changed = not torch.equal(p, base_params[key])
        prefix = next((m for m in moved if name.startswith(m)), None)
        if prefix is None:
            assert not changed, f"frozen parameter {name} changed"
        else:
            moved[prefix] |= changed
    assert all(moved.values()), moved
    with open(os.path.join(sft_run, "training_info.json")) as f:
        info = json.load(f)
    start, best = info["initial_val"]["mean_dice"], info["best_val_dice"]
    print(f"tiny-qwenvl held-out Dice: {start:.4f} -> {best:.4f}")
    assert best > start + 0.2


def test_merge_equals_base_plus_adapter(folder, synth_data, tmp_path):
    """A stage checkpoint of the folder (LoRA + heads moved by a fixed random step) merged by
    merge_lora.py: the merged folder reloads and gives base + adapter's masks on both paths."""
    model, tokenizer = load_model(folder)
    apply_lora(model, 8, 16, dropout=0.0)
    parts = ["lora", "text_hidden_fcs", "mask_decoder"]
    set_trainable(model, parts)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    from common.lora import base_fingerprint
    stage = str(tmp_path / "best")
    save_stage(model, stage, parts, dict(stage="sft", base_model=folder, base_fingerprint=base_fingerprint(model),
                                         prompt=DEFAULT_PROMPT, answer="It is [SEG].", args={}))
    out = str(tmp_path / "merged")
    info = merge_lora.main(merge_lora.parse_args(["--base_model", folder, "--lora_weights", stage, "--output_model", out,
                                                  "--device", "cpu"]))
    assert info["lora_merged"] and info["mask_pixels_differing"] == 0
    assert {"chat_template.jinja", "tokenizer.json", "config.json"} <= set(os.listdir(out))

    frames = [s["image"] for s in samples(synth_data)]

    @torch.no_grad()
    def run(m, tok):
        m.eval()
        batch = Sa2VAProcessor(describe(m, tok), tok)([dict(image=im, key=str(i)) for i, im in enumerate(frames)])
        logits = full_size_logits(m, forward_batch(m, batch)["low_res_logits"], batch["image_sizes"])
        return logits, [predict(m, tok, im, DEFAULT_PROMPT) for im in frames]

    base, base_tok = load_model(folder)
    base_logits, _ = run(base, base_tok)
    load_stage(base, stage)
    adapter_logits, adapter_pred = run(base, base_tok)
    merged, merged_tok = load_model(out)
    assert not hasattr(merged.model, "peft_config")
    merged_logits, merged_pred = run(merged, merged_tok)
    assert max(float((a - b).abs().max()) for a, b in zip(base_logits, adapter_logits)) > 0.1
    diff = max(float((a - m).abs().max()) for a, m in zip(adapter_logits, merged_logits))
    print(f"tiny-qwenvl merged vs base + adapter: max |mask logit diff| {diff:.3g}")
    assert diff < 1e-4
    for a, m in zip(adapter_pred, merged_pred):
        assert a["prediction"] == m["prediction"]
        for x, y in zip(a["prediction_masks"], m["prediction_masks"]):
            assert np.array_equal(x, y)


def test_every_stage_script_takes_tiny_qwenvl(sft_run, synth_data, tmp_path):
    """The stage chain on tiny-qwenvl through the same code path: mine -> hard -> DPO pairs + DPO
    -> PPO -> evaluate, each from the SFT checkpoint, at toy sizes."""
    import evaluate
    import make_dpo_pairs
    import mine_hard
    import train_dpo
    import train_hard
    import train_ppo
    sft = os.path.join(sft_run, "best")
    model = ["--model", "tiny-qwenvl", "--data", synth_data]
    mined = mine_hard.main(mine_hard.parse_args(model + ["--init", sft, "--output", str(tmp_path / "mine"),
                                                         "--max_train_samples", "16", "--num_workers", "0"]))
    hard_list = os.path.join(str(tmp_path / "mine"), "hard_samples.json")
    assert os.path.isfile(hard_list) and mined
    hard = train_hard.main(train_hard.parse_args(model + ["--init", sft, "--hard_list", hard_list, "--threshold_hard",
                                                          "1.01", "--output", str(tmp_path / "hard"), "--epochs", "1",
                                                          "--log_every", "100"] + SMALL))
    make_dpo_pairs.main(make_dpo_pairs.parse_args(model + ["--init", sft, "--mode", "gt", "--max_dice", "1.01",
                                                           "--output", str(tmp_path / "pairs"), "--num_workers", "0",
                                                           "--max_train_samples", "16"]))
    dpo = train_dpo.main(train_dpo.parse_args(model + ["--init", sft, "--pairs", str(tmp_path / "pairs"), "--output",
                                                       str(tmp_path / "dpo"), "--epochs", "1", "--patience", "0",
                                                       "--log_every", "100"] + SMALL))
    ppo = train_ppo.main(train_ppo.parse_args(model + ["--init", sft, "--output", str(tmp_path / "ppo"), "--epochs", "1",
                                                       "--rollout_batches", "1", "--ppo_epochs", "1", "--group_size",
                                                       "2", "--log_every", "100"] + SMALL))
    for run in (hard, dpo, ppo):
        assert os.path.isfile(os.path.join(run, "final", "stage.json"))
    summary = evaluate.main(evaluate.parse_args(model + ["--checkpoints", "base", f"sft={sft}",
                                                         f"hard={os.path.join(hard, 'final')}", "--output",
                                                         str(tmp_path / "eval"), "--max_val_samples", "8",
                                                         "--num_workers", "0", "--overlays", "0", "--no_cldice"]))
    assert summary
