"""Check this project against the RELEASED Qwen-VL-family Sa2VA class (`Sa2VAChatModelQwen`).

For each family asked (--families qwen3_vl qwen2_5_vl):
(1) build the released class from its code folder (bytedance/Sa2VA projects/sa2va/hf/models_qwen3vl/
    or models_qwen2_5_vl/) at a TINY random config (2 text layers of width 64, 1 vision block; SAM2 is
    the released Hiera-L, random), teach its LLM to answer "It is [SEG]." (a few seconds), and save
    it as a Hugging Face folder (code + config.json + safetensors + processor files);
(2) load that folder with this project's `common.sa2va.load_model` (trust_remote_code, the shims);
(3) run the released `predict_forward(image, text, processor=...)` and this project's forward path
    with the answer it generated: [SEG] state, its projection, full-size logits, mask equality;
(4) one SFT step through this project's forward path (`cli.setup_model` as train_sft.py: LoRA medium
    + text_hidden_fcs + mask decoder): every trained part changed, the vision tower did not.
Prints one table row per family and the JSON report; exits non-zero when a check fails.

    # once, on a machine with the Sa2VA sources (nothing of them is committed):
    python tests/real/check_qwenvl_released.py --sa2va_repo /path/to/Sa2VA --extract_to .sa2va_code_qwen
    # then (GPU; carry .sa2va_code_qwen):
    python tests/real/check_qwenvl_released.py --sa2va_code .sa2va_code_qwen --out qwenvl_check.json

Needs transformers >= 4.57 (Qwen3-VL). The released code imports torchvision (DirectResize's
to_pil_image) and qwen_vl_utils (process_vision_info); where one is missing (CPU CI; a GPU box
without qwen_vl_utils) it is stubbed INSIDE THIS SCRIPT ONLY, and the report says so: torchvision's
to_pil_image by PIL.Image.fromarray, process_vision_info by common.qwenvl.fetch_image (the same
algorithm as qwen_vl_utils' fetch_image for PIL images). On a CPU the released code's hard-coded
`.cuda()` and its bf16 `torch_dtype` are pointed at the CPU / the model's dtype while it runs.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CODE_DIRS = {"qwen3_vl": "models_qwen3vl", "qwen2_5_vl": "models_qwen2_5_vl"}
HF_DIRS = ("projects/sa2va/hf",)
REQUIRED = ("modeling_sa2va_qwen.py", "configuration_sa2va_chat.py", "sam2.py", "templates.py")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sa2va_code", default=os.path.join(ROOT, ".sa2va_code_qwen"),
                   help="folder holding models_qwen3vl/ and models_qwen2_5_vl/ (e.g. <clone>/projects/sa2va/hf)")
    p.add_argument("--sa2va_repo", default=None, help="a Sa2VA clone (work tree or bare git dir) to take the code from")
    p.add_argument("--extract_to", default=None, help="only copy the Qwen-VL code folders of --sa2va_repo here and stop")
    p.add_argument("--families", nargs="+", choices=tuple(CODE_DIRS), default=list(CODE_DIRS))
    p.add_argument("--work", default=None, help="where to write the model folders (default: a temporary folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                   help="weights of the parity runs (default: bf16 and fp32 on cuda, fp32 on cpu); fp32 must give "
                        "equal masks, bf16 at most --max_bf16_share of pixels differing (kernels of a 1-token decode "
                        "step and of a full forward round differently in bf16)")
    p.add_argument("--max_bf16_share", type=float, default=1e-3, help="see --dtypes")
    p.add_argument("--image_size", type=int, default=512, help="side of the synthetic angiography frame")
    p.add_argument("--teach_steps", type=int, default=60, help="steps teaching the tiny LLM 'It is [SEG].'")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the released code and its imports

def extract_code(repo, dest):
    """Copy models_qwen3vl/ and models_qwen2_5_vl/ of a Sa2VA clone (work tree, or bare git dir)."""
    os.makedirs(dest, exist_ok=True)
    for sub in HF_DIRS:
        if os.path.isdir(os.path.join(repo, sub)):
            for name in CODE_DIRS.values():
                shutil.copytree(os.path.join(repo, sub, name), os.path.join(dest, name), dirs_exist_ok=True)
            return dest
        paths = [f"{sub}/{name}" for name in CODE_DIRS.values()]
        archive = subprocess.run(["git", "--git-dir", repo, "archive", "HEAD"] + paths, capture_output=True)
        if archive.returncode != 0:
            archive = subprocess.run(["git", "-C", repo, "archive", "HEAD"] + paths, capture_output=True)
        if archive.returncode == 0:
            subprocess.run(["tar", "-x", "-C", dest, "--strip-components", str(sub.count("/") + 1)],
                           input=archive.stdout, check=True)
            return dest
    raise SystemExit(f"{repo}: no {HF_DIRS[0]}/{{{','.join(CODE_DIRS.values())}}} in its work tree or git HEAD")


def stub_missing_imports():
    """torchvision / qwen_vl_utils stand-ins for the released code, in this process only."""
    import importlib.machinery
    import importlib.util

    import transformers  # noqa: F401  (imported first: it asks whether torchvision is installed)
    from PIL import Image
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        tv, transforms, functional = (types.ModuleType(n) for n in
                                      ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
        for module in (tv, transforms, functional):  # a spec, so later find_spec calls do not raise
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        functional.to_pil_image = lambda pic, mode=None: Image.fromarray(np.asarray(pic), mode=mode)
        tv.transforms, transforms.functional = transforms, functional
        sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})
        stubs.append("torchvision (to_pil_image = PIL.Image.fromarray)")
    if importlib.util.find_spec("qwen_vl_utils") is None:
        from common.qwenvl import fetch_image
        utils = types.ModuleType("qwen_vl_utils")
        utils.__spec__ = importlib.machinery.ModuleSpec("qwen_vl_utils", None)

        def process_vision_info(messages):
            images = [c["image"] for m in messages for c in (m["content"] if isinstance(m["content"], list) else [])
                      if c.get("type") == "image" or "image" in c]
            return ([fetch_image(i) for i in images] or None), None
        utils.process_vision_info = process_vision_info
        sys.modules["qwen_vl_utils"] = utils
        stubs.append("qwen_vl_utils (process_vision_info = common.qwenvl.fetch_image)")
    return stubs


# ------------------------------------------------------------------ (1) build the released class, tiny

def released_config(family, tokenizer, dtype_name):
    """config.json of Sa2VAChatModelQwen at the tiny sizes of common.tiny_qwenvl (the config class is
    the Qwen-VL config itself, plus `template`)."""
    import transformers
    from common.tiny_qwenvl import tiny_vl_config
    config = tiny_vl_config(family, tokenizer)
    config["text_config"].update(dtype=dtype_name, model_type=f"{family}_text")
    config["vision_config"].update(model_type=f"{family}_vision")
    return dict(config, architectures=["Sa2VAChatModelQwen"], model_type="sa2va_chat", template="qwen_chat",
                torch_dtype=dtype_name, transformers_version=transformers.__version__,
                auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                          "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                          "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"})


def full_processor(family, tokenizer):
    """The family's processor class with a video processor where torchvision allows (so that
    AutoProcessor loads it as released folders load), else images only."""
    import transformers
    from common.tiny_qwenvl import build_processor, vl_classes
    processor = build_processor(family, tokenizer)
    video_cls = getattr(transformers, "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor", None)
    try:
        _, _, processor_cls = vl_classes(family)
        return processor_cls(image_processor=processor.image_processor, tokenizer=tokenizer,
                             video_processor=video_cls(), chat_template=processor.chat_template)
    except Exception:  # no torchvision: no video processor
        return processor


def build_folder(family, code_root, out, teach_steps, seed=0):
    """Write the released class at a tiny config to `out`; returns the teaching loss."""
    from build_released_tiny import save_weights
    from common.sa2va import released_classes
    from common.tiny import build_tokenizer
    from common.tiny_qwenvl import SPECIAL_TOKENS, teach_answer
    code = os.path.join(code_root, CODE_DIRS[family])
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(code, f))]
    if missing:
        raise SystemExit(f"{code}: not the released Qwen-VL Sa2VA code (missing {', '.join(missing)}); "
                         f"extract it with --sa2va_repo ... --extract_to {code_root}")
    tmp = tempfile.mkdtemp(prefix="sa2va_qwen_build_", dir=os.path.dirname(out))  # dot-free: imported by name
    try:
        for f in glob.glob(os.path.join(code, "*.py")):
            shutil.copy(f, tmp)
        tokenizer = build_tokenizer(SPECIAL_TOKENS)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(released_config(family, tokenizer, "float32"), f, indent=2)
        torch.manual_seed(seed)
        config, model_cls = released_classes(tmp)
        model = model_cls(config).float()
        processor = full_processor(family, tokenizer)
        loss = teach_answer(model, processor, steps=teach_steps, seed=seed)
        save_weights(model.state_dict(), tmp)
        processor.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return loss, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ (3) parity, (4) one SFT step

def released_predict(model, processor, image, prompt, device):
    """predict_forward's answer and masks, plus the [SEG] state it fed to text_hidden_fcs."""
    from check_parity import released_on
    seen = {}
    hook = model.text_hidden_fcs.register_forward_hook(
        lambda m, inp, out: seen.update(seg_hidden=inp[0].detach().float().cpu(), seg_embed=out.detach().float().cpu()))
    try:
        with released_on(model, device), torch.no_grad():
            result = model.predict_forward(image=image, text=prompt, processor=processor)
    finally:
        hook.remove()
    seen.update(prediction=result["prediction"], masks=[m[0] for m in result["prediction_masks"]])
    return seen


def parity(model, tokenizer, image, prompt, device):
    from common.forward import forward_batch, full_size_logits, move_batch
    from common.qwenvl import seg_convention
    from common.sa2va import DEFAULT_ANSWER, Sa2VAProcessor, describe
    rel = released_predict(model, tokenizer, image, prompt, device)  # load_model's processor
    answer = rel["prediction"].strip()
    for end in ("<|im_end|>", "<|endoftext|>"):
        answer = answer.removesuffix(end).rstrip()
    report = dict(prediction=rel["prediction"], released_masks=len(rel["masks"]),
                  seg_hidden_state=seg_convention(model))
    if "[SEG]" not in answer:
        report["note"] = f"no [SEG] in the answer: forward path run with {DEFAULT_ANSWER!r}, no mask to compare"
        answer = DEFAULT_ANSWER
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, prompt, answer)
    batch = move_batch(processor([dict(image=image, key="x")]), device)
    with torch.no_grad():
        out = forward_batch(model, batch)
        logits = full_size_logits(model, out["low_res_logits"], batch["image_sizes"])[0].float().cpu()
        from common.forward import llm_forward
        seg_hidden, _ = llm_forward(model, batch)
    ours = (logits.sigmoid() > 0.5).numpy()
    report["our_mask_pixels"] = int(ours.sum())
    if rel["masks"]:
        theirs = rel["masks"][0]
        report.update(seg_hidden_max_diff=float((seg_hidden[0].float().cpu() - rel["seg_hidden"][0]).abs().max()),
                      seg_embed_max_diff=float((out["seg_embeds"][0].float().cpu() - rel["seg_embed"][0]).abs().max()),
                      released_mask_pixels=int(theirs.sum()), masks_equal=bool((ours == theirs).all()),
                      mask_pixels_differing=int((ours != theirs).sum()))
    return report


def sft_step(folder, device, image_size):
    """One optimizer step of train_sft.py's setup through the forward path; which parts moved."""
    import train_sft
    from common import cli
    from common.forward import forward_batch, full_size_logits, move_batch
    from common.losses import segmentation_loss
    from common.synth import make_video
    from PIL import Image
    args = train_sft.parse_args(["--model", folder, "--data", "unused", "--lora_preset", "medium"])
    model, processor, parts = cli.setup_model(args, log=lambda *a: None)
    model.to(device).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, masks, _ = make_video(np.random.default_rng(1), 2, image_size)
    batch = move_batch(processor([dict(image=Image.fromarray(i), key=str(k)) for k, i in enumerate(images)]), device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.time()
    out = forward_batch(model, batch, with_text_logits=False)
    loss = segmentation_loss(full_size_logits(model, out["low_res_logits"], batch["image_sizes"]),
                             [torch.from_numpy(m).float().to(device) for m in masks])["loss"]
    loss.backward()
    opt.step()
    step_s = time.time() - t0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    groups = {"lora_B": [n for n in before if "lora_B" in n],
              "text_hidden_fcs": [n for n in before if n.startswith("text_hidden_fcs.")],
              "mask_decoder": [n for n in before if ".sam_mask_decoder.output_hypernetworks_mlps" in n
                               or ".sam_mask_decoder.transformer" in n],
              "vision": [n for n in before if ".visual." in n]}
    moved = {g: sum(n in changed for n in names) for g, names in groups.items()}
    ok = (moved["lora_B"] > 0 and moved["text_hidden_fcs"] == len(groups["text_hidden_fcs"])
          and moved["mask_decoder"] > 0 and moved["vision"] == 0)
    return dict(parts=parts, loss=float(loss), step_s=step_s, moved=moved,
                counts={g: len(v) for g, v in groups.items()}, ok=bool(ok))


def main(args):
    if args.sa2va_repo and args.extract_to:
        print(f"code folders written to {extract_code(args.sa2va_repo, args.extract_to)}")
        return None
    code_root = extract_code(args.sa2va_repo, tempfile.mkdtemp(prefix="sa2va_code_")) if args.sa2va_repo \
        else args.sa2va_code
    stubs = stub_missing_imports()
    import transformers
    from PIL import Image
    from common.sa2va import load_model
    from common.synth import make_video
    device = torch.device(args.device)
    dtypes = args.dtypes or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    work = args.work or tempfile.mkdtemp(prefix="qwenvl_check_")
    os.makedirs(work, exist_ok=True)
    image = Image.fromarray(make_video(np.random.default_rng(0), 1, args.image_size)[0][0])
    prompt = "<image>\nPlease segment the blood vessel."
    report = dict(transformers=transformers.__version__, torch=torch.__version__, device=str(device),
                  dtypes=dtypes, stubs=stubs, families={})
    for family in args.families:
        row = report["families"][family] = {}
        folder = os.path.join(work, f"sa2va_{family}_tiny")
        t0 = time.time()
        row["teach_loss"], row["parameters"] = build_folder(family, code_root, folder, args.teach_steps)
        row["build_s"] = time.time() - t0
        row["parity"] = {}
        for name in dtypes:
            model, tokenizer = load_model(folder, dtype=DTYPES[name])
            row["cls"] = type(model).__name__
            model.to(device).eval()
            model.torch_dtype = DTYPES[name]  # the release hard-codes bf16 for SAM2 pixels (as is in a bf16 run)
            row["parity"][name] = par = parity(model, tokenizer, image, prompt, device)
            share = par.get("mask_pixels_differing", 1) / (args.image_size ** 2)
            par["ok"] = bool(par.get("masks_equal")) or (name == "bf16" and share <= args.max_bf16_share)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["sft_step"] = sft_step(folder, device, args.image_size)
    lines = ["| family | class | dtype | answer | [SEG] state | [SEG] max diff | masks equal (px differing) | SFT step "
             "moved (lora_B, fcs, decoder, vision) | ok |", "|---|---|---|---|---|---|---|---|---|"]
    ok_all = True
    for family, row in report["families"].items():
        step = row["sft_step"]
        moved = step["moved"]
        for name, par in row["parity"].items():
            ok = par["ok"] and step["ok"]
            ok_all &= ok
            lines.append(f"| {family} | {row['cls']} | {name} | {par['prediction']!r} | {par['seg_hidden_state']} | "
                         f"{par.get('seg_hidden_max_diff', float('nan')):.3g} | {par.get('masks_equal')} "
                         f"({par.get('mask_pixels_differing')}) | {moved['lora_B']}/{step['counts']['lora_B']}, "
                         f"{moved['text_hidden_fcs']}/{step['counts']['text_hidden_fcs']}, "
                         f"{moved['mask_decoder']}/{step['counts']['mask_decoder']}, {moved['vision']} | {ok} |")
    report["ok"] = ok_all
    text = json.dumps(report, indent=2, default=str)
    print(text)
    print(f"\ntransformers {report['transformers']}, torch {report['torch']}, {report['device']}"
          + (f"; stubbed: {', '.join(stubs)}" if stubs else ""))
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n\n" + "\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if (main(parse_args()) or {}).get("ok", True) else 1)
