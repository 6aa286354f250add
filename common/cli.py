"""The flags every script shares (one vocabulary, DESIGN.md), and the model setup they share.

Each script adds its own flags and defaults after these; `--help` of any script lists all.
"""
import argparse
import math
import os
import sys

import torch

from common.data import CURRICULA, DATA_FORMATS, MASK_RULES, VIDEO_REGEX, DataError, MaskRule, check_video_regex
from common.files import RunError
from common.forward import bf16_autocast
from common.lora import LORA_PRESETS, apply_lora, count_parameters, has_lora, load_stage, set_trainable
from common.sa2va import (DEFAULT_ANSWER, DEFAULT_PROMPT, TINY, TINY_QWENVL, CheckpointError, Sa2VAProcessor, describe,
                          llm_module, load_model)

DEBUG_ENV = "SA2VA_DEBUG"  # set to 1: errors show their Python traceback, as --debug does
# Errors a user can fix (bad data, a bad checkpoint, an output another run holds, the file system
# saying no): their message names the file, so the script prints that line, not a traceback
USER_ERRORS = (DataError, CheckpointError, RunError, OSError)


class Parser(argparse.ArgumentParser):
    """ArgumentParser that checks the shared data flags once parsed, so a bad --video_regex or mask
    rule is a one-line usage error at start, not an IndexError or a DataError mid-run, and that
    turns --still_images into its meaning (video_regex None: every image its own video)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if hasattr(parsed, "video_regex"):
            if getattr(parsed, "still_images", False):
                if parsed.video_regex not in (VIDEO_REGEX, None):
                    self.error("--still_images and --video_regex exclude each other (still images have no frames)")
                parsed.video_regex = None
            try:
                check_video_regex(parsed.video_regex)
                MaskRule.from_args(parsed)
            except DataError as e:
                self.error(str(e))
        return parsed, rest


def parser(description):
    return Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=TINY, help="base Sa2VA: a local Hugging Face folder (InternVL or Qwen-VL family), "
                                                 f"`{TINY}` (the embedded default, built in memory) or `{TINY_QWENVL}` "
                                                 "(its Qwen3-VL-family twin); nothing is downloaded")
    g.add_argument("--init", default=None, help="stage checkpoint to start from (e.g. the SFT run's best/)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="user prompt; must contain <image>")
    g.add_argument("--answer", default=DEFAULT_ANSWER, help="teacher-forced answer; must contain [SEG]")
    g.add_argument("--bf16", action="store_true", help="bf16 weights/activations (DeepSpeed) or autocast (plain torch, GPU)")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the LLM (less memory, ~30%% slower)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, splits and initialisation")


def add_data_args(p, require_data=True):
    g = p.add_argument_group("data")
    g.add_argument("--data", required=require_data, help="data folder: images/ + masks/, or images/ + annotations.json "
                                                         "(Sa2VA polygons); + optional splits.json")
    g.add_argument("--data_format", default="auto", choices=DATA_FORMATS,
                   help="layout of --data: masks, annotations (needs pycocotools), or auto = the one the folder has")
    g.add_argument("--allow_empty_annotations", action="store_true",
                   help="annotations.json entries with no polygon become all-background targets (with a warning) "
                        "instead of an error")
    g.add_argument("--val_fraction", type=float, default=0.2, help="share of VIDEOS held out when there is no splits.json")
    g.add_argument("--max_train_samples", type=int, default=0, help="cap on training frames (0 = all)")
    g.add_argument("--max_val_samples", type=int, default=0, help="cap on validation frames (0 = all)")
    g.add_argument("--video_regex", default=VIDEO_REGEX, help="regex with groups video and frame, applied to file stems")
    g.add_argument("--still_images", action="store_true",
                   help="the images are independent stills, not video frames: each is its own video (split, "
                        "clusters, GIFs). Without it drive_01 ... drive_20 read as 20 frames of one video 'drive'")
    g.add_argument("--mask_rule", default="auto", choices=MASK_RULES,
                   help="how mask values become vessel: auto decides binary, small-valued (label map, 0/1 JPEG: > 0) "
                        "and grey 0-255 masks (> half range) and refuses what it cannot tell (0/1/255 VOC-style); "
                        "nonzero = > 0; half = > half the range; values = --vessel_values")
    g.add_argument("--vessel_values", default=None,
                   help="comma list of the mask values that are vessel (e.g. 1 for VOC-style 0/1/255-void masks, or "
                        "1,2 for artery/vein label maps); every other value is background. Implies --mask_rule values")
    g.add_argument("--resize_masks", action="store_true", help="resize masks whose size differs from their image "
                                                               "(nearest) instead of stopping with an error")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--threshold", type=float, default=0.5, help="probability threshold of a vessel pixel")


def add_train_args(p, lr, epochs, batch_size, grad_accum, weight_decay, trainable):
    g = p.add_argument_group("optimisation")
    g.add_argument("--output", default="outputs", help="runs are written to <output>/<stage>_<timestamp>/")
    g.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training split")
    g.add_argument("--batch_size", type=int, default=batch_size, help="samples per GPU (or process) per micro-step")
    g.add_argument("--grad_accum", type=int, default=grad_accum, help="micro-steps per optimizer step")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="share of optimizer steps with linear warm-up")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--trainable", default=trainable,
                   help="comma list of trained parts: lora, llm, text_hidden_fcs, mask_decoder, prompt_encoder, mlp1, vision, "
                        "sam_encoder (SAM2's image encoder: README, \"Real images\")")
    g.add_argument("--log_every", type=int, default=10, help="optimizer steps between log lines")
    g.add_argument("--save_every", type=int, default=0, help="optimizer steps between resume checkpoints (0 = each epoch)")
    g.add_argument("--resume", default=None, help="run folder of a killed run to continue from its last checkpoint")
    g.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many steps with a non-finite loss")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each LLM decoder layer: fuses the norm / rotary / activation / dtype-cast work "
                        "between the matmuls (about 45%% of a cached 4B step's GPU time, README Performance); the first "
                        "steps compile")
    g.add_argument("--feature_cache_gb", type=float, default=2.0,
                   help="memory for caching frozen features (SAM2 image features; [SEG] states when the LLM is frozen)")
    d = p.add_argument_group("distributed")
    d.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                   help="auto = DeepSpeed when launched by `deepspeed`, plain torch otherwise. torch under the "
                        "deepspeed launcher (or torchrun) = data parallel with one flat gradient all-reduce and a fused "
                        "AdamW: 1.9x DeepSpeed ZeRO-2's step for LoRA at the 4B shape (README, Performance); DeepSpeed "
                        "for --offload_optimizer or a large trained set")
    d.add_argument("--zero_stage", type=int, default=2, choices=(0, 1, 2),
                   help="DeepSpeed ZeRO stage. 3 is not offered: it shards the frozen base weights, which LoRA "
                        "training does not need (the 26B release trains in 54 GiB with ZeRO-2), and SAM2's code "
                        "reads parameters outside module forwards, which ZeRO-3 leaves empty (README, Performance)")
    d.add_argument("--offload_optimizer", action="store_true", help="ZeRO optimizer states in CPU memory")
    d.add_argument("--deepspeed_config", default=None, help="JSON merged over the config built from these flags")
    d.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")


def add_lora_args(p, preset="medium"):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_preset", default=preset, choices=tuple(LORA_PRESETS) + ("none",),
                   help="rank/alpha: small 16/32, medium 32/64, large 64/128; none = no new adapter")
    g.add_argument("--lora_rank", type=int, default=None, help="overrides the preset's rank")
    g.add_argument("--lora_alpha", type=int, default=None, help="overrides the preset's alpha")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA path")
    g.add_argument("--lora_mlp", action="store_true", help="also adapt the MLP projections, not only attention")


def add_curriculum_args(p):
    g = p.add_argument_group("curriculum")
    g.add_argument("--curriculum", choices=CURRICULA, default="off",
                   help="off: every epoch trains on all frames in random order. area: large vessels first (the "
                        "methodology's PPO notes): the frames, ranked by vessel area in their masks, are cut into "
                        "--curriculum_phases groups; the epochs train on growing subsets (the largest-vessel group, "
                        "then the two largest, ...), the last epoch on all, each epoch group by group, shuffled "
                        "within a group")
    g.add_argument("--curriculum_phases", type=int, default=3,
                   help="groups of --curriculum area: 3 = large, medium, thin vessels")


def pos_weight(value):
    """argparse type of --bce_pos_weight: `balanced` or a positive number (1 = plain BCE)."""
    if value == "balanced":
        return value
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected `balanced` or a positive number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected `balanced` or a positive number, got {value!r}")
    return number


def add_mask_loss_args(p, dice_weight, bce_weight, pos_weight_default):
    g = p.add_argument_group("mask loss")
    g.add_argument("--dice_weight", type=float, default=dice_weight, help="weight of the soft Dice loss")
    g.add_argument("--bce_weight", type=float, default=bce_weight, help="weight of the per-pixel BCE loss")
    g.add_argument("--bce_pos_weight", type=pos_weight, default=pos_weight_default,
                   help="weight of vessel pixels in the BCE: `balanced` = background / vessel pixels of each mask "
                        "(vessel and background weigh the same), or a number (1 = plain BCE, which calibrates "
                        "probabilities to the ~10%% vessel prior: a model that cannot yet separate thin vessels "
                        "then predicts empty masks at threshold 0.5; README, 'Why SFT collapsed')")
    return g


# ---------------------------------------------------------------- argument checks

def _output_folder(path):
    """True when `path` can be (or is) a folder: neither it nor its nearest existing parent is a file."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path)


def _thresholds(text):
    try:
        return all(0 < float(t) < 1 for t in text.split(",") if t.strip())
    except ValueError:
        return False


# What each flag may be, by destination name: one vocabulary across scripts, so one table. NaN fails
# every comparison and inf every finite check. None (an optional flag left out) is always allowed.
POSITIVE_INT = (lambda v: v >= 1, "an integer >= 1")
COUNT = (lambda v: v >= 0, "an integer >= 0")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
PROBABILITY = (lambda v: 0 < v < 1, "a probability in (0, 1)")
ARG_RULES = {
    **dict.fromkeys(("batch_size", "epochs", "grad_accum", "log_every", "lora_rank", "lora_alpha", "group_size",
                     "rollout_batches", "ppo_epochs", "iterations", "min_cluster_len", "num_samples", "gif_ms",
                     "clip_frames", "per_video", "curriculum_phases"), POSITIVE_INT),
    **dict.fromkeys(("max_train_samples", "max_val_samples", "num_workers", "save_every", "max_bad_steps",
                     "eval_every", "patience", "max_gap", "top", "max_pairs_per_image", "verify_frames", "overlays",
                     "panel"), COUNT),
    **dict.fromkeys(("lr", "critic_lr", "beta", "clip", "temperature"), POSITIVE),
    # Dice thresholds: a frame is hard / paired when its Dice is below it, so > 1 means every frame
    **dict.fromkeys(("threshold_hard", "max_dice"), POSITIVE),
    **dict.fromkeys(("weight_decay", "grad_clip", "feature_cache_gb", "dice_weight", "bce_weight", "text_weight",
                     "recall_weight", "topology_weight", "length_weight", "kl_coef", "entropy_coef", "vf_coef",
                     "noise_sigma", "min_distance", "sft_coef"), NON_NEGATIVE),
    **dict.fromkeys(("val_fraction", "val_pair_fraction", "warmup_ratio", "easy_ratio", "min_iou_gap",
                     "max_mask_diff", "contrast_level", "select_by_variance", "hard_share",
                     "disagreement_threshold"), FRACTION),
    "threshold": PROBABILITY,
    "thresholds": (_thresholds, "a comma list of probabilities in (0, 1)"),
    "recall_target": (lambda v: 0 < v <= 1, "a recall in (0, 1]"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a dropout probability in [0, 1)"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a share of flipped preferences in [0, 0.5)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32) (numpy's seed range)"),
    "local_rank": (lambda v: v >= -1, "an integer >= -1"),
    **dict.fromkeys(("output", "output_model"), (_output_folder, "a folder, not an existing file (nor inside one)")),
    "resume": (os.path.isdir, "an existing run folder"),
}


def check_args(args):
    """The first impossible value of the parsed `args` (ARG_RULES) as one sentence, or None."""
    for name, value in vars(args).items():
        if name in ARG_RULES and value is not None:
            valid, says = ARG_RULES[name]
            if not valid(value):
                return f"argument --{name}: got {value!r}, must be {says}"
    return None


def parse(p, argv=None):
    """Parse and check the arguments (`check_args`): an impossible value stops the script here, before
    any model loads, with one line and exit code 2 (argparse's error line, without its usage block,
    which would bury the reason under 25 lines of flags). Adds --debug."""
    p.add_argument("--debug", action="store_true",
                   help=f"on an error, show the Python traceback (also: {DEBUG_ENV}=1 in the environment); without "
                        f"it a script prints the one-line reason and exits with 1")
    args = p.parse_args(argv)
    problem = check_args(args)
    if problem:
        p.exit(2, f"{p.prog}: error: {problem}\n")
    return args


def run_main(main, parse_args, argv=None):
    """A script's `__main__`: main(parse_args()), with the errors a user can fix (USER_ERRORS, and
    SystemExit with a message) printed as `<script>: error: <reason>` on stderr, exit code 1. The
    traceback stays behind --debug or SA2VA_DEBUG=1."""
    args = parse_args(argv)
    script = os.path.basename(sys.argv[0]) or "python"
    try:
        return main(args)
    except USER_ERRORS as e:
        if getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"{script}: error: {e.code}", file=sys.stderr, flush=True)
        sys.exit(1)


def compile_decoder_layers(llm, backend="inductor"):
    """torch.compile every decoder layer of the LLM in place (regional compilation: the layers share one
    compiled graph, so compiling costs about one layer). Returns how many were compiled."""
    layers = [m for m in llm.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def load_for_inference(args, init, device, bf16_weights=False, base=None):
    """(model, processor, autocast) to score or predict with: the base model (`base`, else --model) +
    the stage checkpoint `init`, in eval mode on `device`, and the processor of --prompt / --answer.
    --bf16 autocasts on a GPU only (CPU bf16 kernels are slower and round differently);
    `bf16_weights` also loads the weights in bf16 (the prediction path, as the released inference)."""
    model, tokenizer = load_model(base or args.model, dtype=torch.bfloat16 if bf16_weights else torch.float32,
                                  seed=args.seed)
    if init:
        load_stage(model, init)
    model.to(device).eval()
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, getattr(args, "prompt", DEFAULT_PROMPT),
                               getattr(args, "answer", DEFAULT_ANSWER))
    return model, processor, bf16_autocast(args.bf16 and device.type == "cuda", device)


def setup_model(args, log=print):
    """(model, processor of --prompt / --answer, parts its checkpoints hold): the base model + optional
    --init stage + optional new LoRA, with only the --trainable parts trainable. The parts held are the
    trained ones and those the --init checkpoint holds (a stage checkpoint stands on the base model alone)."""
    # bf16 runs load bf16 weights: a 26B model in fp32 would need ~100 GB of host memory per
    # process. What trains is cast back to fp32 below (plain torch keeps fp32 masters and
    # autocasts; DeepSpeed bf16 keeps its own fp32 masters)
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, seed=args.seed)
    init_parts = []
    if getattr(args, "init", None):
        meta = load_stage(model, args.init, trainable_lora="lora" in args.trainable.split(","))
        init_parts = meta.get("trained_parts", [])
        log(f"init: {args.init} (stage {meta.get('stage')}, parts {init_parts})")
    preset = getattr(args, "lora_preset", "none")
    if preset != "none" and not has_lora(model):
        rank, alpha = LORA_PRESETS[preset]
        rank, alpha = args.lora_rank or rank, args.lora_alpha or alpha
        apply_lora(model, rank, alpha, args.lora_dropout, args.lora_mlp)
        log(f"LoRA: rank {rank}, alpha {alpha}, {'attention + MLP' if args.lora_mlp else 'attention'}")
    parts = [s for s in args.trainable.split(",") if s]
    set_trainable(model, parts)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.grad_ckpt:
        llm_module(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # InternLM2's remote code ignores those kwargs and checkpoints with the reentrant variant,
        # which passes no gradient to LoRA unless the layer input requires grad (the embeddings
        # are frozen): make it require grad, as the released wrap_llm_lora does
        llm_module(model).enable_input_require_grads()
    if getattr(args, "compile", False):
        log(f"torch.compile: {compile_decoder_layers(llm_module(model))} LLM decoder layers")
    trainable, total = count_parameters(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) in {', '.join(parts)}")
    processor = Sa2VAProcessor(describe(model, tokenizer), tokenizer, args.prompt, args.answer)
    return model, processor, parts + [p for p in init_parts if p not in parts and p not in ("lora", "llm")]
