"""Distributed setup, the optimisation engine, resumable checkpoints and logging.

One loop serves both launches: under the `deepspeed` launcher (or with `--zero_stage`
given) the engine is a DeepSpeed engine (ZeRO-2 by default, optimizer offload optional,
bf16); under plain `python` it is `TorchEngine`, a few lines of plain torch with the same
three calls the loops use: `backward(loss)`, `step()`, `save/load_checkpoint`.
"""
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from common.files import RunError, write_json
from common.forward import bf16_autocast
from common.lora import save_stage


# ---------------------------------------------------------------- processes

def use_deepspeed(args):
    """--engine: deepspeed, torch, or auto = DeepSpeed when launched by `deepspeed` (which sets LOCAL_RANK, WORLD_SIZE)."""
    launched = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    return args.engine == "deepspeed" or (args.engine == "auto" and launched)


def init_distributed(use_deepspeed):
    """(rank, world_size, device). Initialises the process group when there are several
    processes (or DeepSpeed, which always wants one)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if use_deepspeed:
        single = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))  # a plain `python` start: one process
        for k, v in single.items():
            os.environ.setdefault(k, v)
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        # gloo has no all-reduce for every dtype on every backend: reduce in float64
        t = tensor.double()
        dist.all_reduce(t)
        return t.to(tensor.dtype)
    return tensor


def all_gather_objects(obj):
    """List of `obj` from every rank (rank order)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    """The processes' last step, on every rank at the end of a script: they wait for each other, then
    close the group, so no rank closes it while another still uses it (rank 1 of a two-process
    mine_hard.py, closing gloo while rank 0 still wrote its files, once died of SIGABRT: "terminate
    called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- optimisation

def lr_lambda(total_steps, warmup_steps):
    """Linear warm-up, then cosine decay to 10% of the peak (as a LambdaLR factor)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def deepspeed_config(args, world_size):
    """The DeepSpeed config, from the parsed arguments in one place."""
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "train_batch_size": args.batch_size * args.grad_accum * world_size,
        "gradient_clipping": args.grad_clip,
        "bf16": {"enabled": bool(args.bf16)},
        "zero_optimization": {"stage": args.zero_stage, "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if getattr(args, "offload_optimizer", False):
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if getattr(args, "deepspeed_config", None):
        with open(args.deepspeed_config) as f:
            config.update(json.load(f))
    return config


class TorchEngine:
    """Plain-torch stand-in for a DeepSpeed engine: gradient accumulation, clipping, a
    scheduler step per optimizer step, bf16 autocast on GPU (non-finite losses: `finite_or_zero`)."""

    def __init__(self, model, optimizer, scheduler, grad_accum, grad_clip, bf16, device):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.autocast = bf16_autocast(bf16, device)
        self.device, self.micro_steps, self.global_steps = device, 0, 0
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        """Returns True when an optimizer step ran (False in the middle of accumulation)."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return False
        if dist.is_initialized():  # data parallel without DDP wrappers: average the gradients
            all_reduce_mean([p.grad for p in self.params if p.grad is not None])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return True

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir, tag, client_state):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        if is_main():
            trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save(dict(params=trainable, optimizer=self.optimizer.state_dict(),
                            scheduler=self.lr_scheduler.state_dict(), micro_steps=self.micro_steps,
                            global_steps=self.global_steps, client_state=client_state),
                       os.path.join(save_dir, tag, "engine.pt"))

    def load_checkpoint(self, load_dir, tag):
        state = torch.load(os.path.join(load_dir, tag, "engine.pt"), map_location="cpu", weights_only=False)
        own = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, v in state["params"].items():
                own[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        return state["client_state"]


def all_reduce_mean(tensors):
    """Average same-dtype tensors over the processes in place, in one flat all-reduce per dtype: LoRA +
    heads are hundreds of small tensors, and one collective each would cost more than the step."""
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for t, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            t.copy_(synced)


def build_engine(model, params, args, total_steps, device, use_deepspeed, world_size):
    """AdamW + warm-up/cosine schedule inside a DeepSpeed engine or a TorchEngine."""
    # On a GPU the fused AdamW updates every tensor in a few kernels: the trained LoRA + heads are
    # hundreds of small tensors, and a per-tensor update loop made the step host-bound (README, Performance)
    fused = device.type == "cuda" and not getattr(args, "offload_optimizer", False)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=fused)
    warmup = max(1, int(args.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))
    if not use_deepspeed:
        model.to(device)
        return TorchEngine(model, optimizer, scheduler, args.grad_accum, args.grad_clip, args.bf16, device)
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(args, world_size))
    engine.autocast = contextlib.nullcontext  # DeepSpeed already holds the weights in bf16
    return engine


def engine_step(engine):
    """engine.step(); True when it was an optimizer step (both engine kinds)."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    return boundary


def gather_for_save(engine):
    """Context factory making ZeRO-3 partitioned parameters whole, or None."""
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed
        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return None


# ---------------------------------------------------------------- runs, resume, logs

def make_run_dir(output, stage, resume):
    """`<output>/<stage>_<timestamp>/`, or the folder of the run being resumed. Created with
    exist_ok=False: two runs started in the same second into one --output must not share a folder
    (and overwrite each other's checkpoints and logs), so the later one gets `_2`, `_3`, ..."""
    if resume:
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such run folder")
        return resume
    run_dir = None
    if is_main():
        os.makedirs(output, exist_ok=True)
        base = os.path.join(output, f"{stage}_{time.strftime('%Y%m%d_%H%M%S')}")
        for n in range(1, 1000):
            run_dir = base if n == 1 else f"{base}_{n}"
            try:
                os.mkdir(run_dir)  # atomic: exactly one run creates a given name
                break
            except FileExistsError:
                continue
        else:
            raise RunError(f"{base}: 999 runs started in this second into {output}")
    # every rank must agree on the folder, whatever their clocks say
    return all_gather_objects(run_dir)[0]


ARGS_FILE = "args.json"
# arguments that may change when a run is resumed: where and how it runs, not what it trains
RESUME_MAY_DIFFER = ("resume", "output", "num_workers", "log_every", "save_every", "local_rank", "debug",
                     "feature_cache_gb", "max_bad_steps", "compile")


def changed_args(saved, args, may_differ=RESUME_MAY_DIFFER):
    """[(name, saved value, value now)] of the arguments that differ from a run's saved ones (JSON
    values, as written to args.json); names only one side knows (another version) are skipped."""
    now = json.loads(json.dumps(vars(args), default=str))
    return [(k, saved[k], now[k]) for k in saved if k in now and k not in may_differ and saved[k] != now[k]]


def check_resume_args(run_dir, args):
    """`--resume` continues the run it names: refuse other arguments (another LoRA rank, say, ends in
    a raw size mismatch deep in torch; another --lr silently trains another run). The run's own
    arguments are its args.json (older runs: best/stage.json); none found: nothing to compare."""
    for path in (os.path.join(run_dir, ARGS_FILE), os.path.join(run_dir, "best", "stage.json")):
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            saved = saved.get("args", {}) if path.endswith("stage.json") else saved
            diff = changed_args(saved, args)
            if diff:
                raise RunError(f"--resume {run_dir}: the run was started with other arguments: "
                               + ", ".join(f"--{k} {a!r} (now {b!r})" for k, a, b in diff)
                               + f"; resume with the run's own arguments ({path}) or start a new run")
            return


LATEST = "latest"


def save_trainer_state(engine, run_dir, state, keep=2):
    """A resume point of the run at `checkpoints/step_<n>`: the engine (weights that train, optimizer,
    scheduler) plus the loop's `state` dict and every RNG, written to a temporary folder and renamed,
    then `checkpoints/latest` updated atomically; older ones pruned to `keep`."""
    root = os.path.join(run_dir, "checkpoints")
    tag = f"step_{state['step']:07d}"
    tmp_root = os.path.join(root, "tmp")
    if is_main():
        shutil.rmtree(os.path.join(tmp_root, tag), ignore_errors=True)
        os.makedirs(tmp_root, exist_ok=True)
    barrier()
    engine.save_checkpoint(tmp_root, tag, client_state=dict(trainer=state, rng=rng_state()))
    barrier()
    if is_main():
        if os.path.isdir(os.path.join(root, tag)):  # saved twice at one step (--save_every at an epoch's end):
            shutil.rmtree(os.path.join(root, tag))  # the later state (epoch closed) replaces the earlier one
        os.replace(os.path.join(tmp_root, tag), os.path.join(root, tag))
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
        tags = sorted(t for t in os.listdir(root) if t.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()


def load_trainer_state(engine, run_dir, state, log):
    """`--resume`: the loop's state saved at the run's last resume point (engine and RNGs
    restored), or `state` unchanged when there is no run to resume (None) or it has none yet."""
    if not run_dir:
        return state
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.exists(os.path.join(root, LATEST)):
        log(f"--resume {run_dir}: no checkpoint yet, starting from the beginning")
        return state
    with open(os.path.join(root, LATEST)) as f:
        tag = f.read().strip()
    client = engine.load_checkpoint(root, tag)
    client = client[1] if hasattr(engine, "zero_optimization_stage") else client  # DeepSpeed: (path, client state)
    set_rng_state(client["rng"])
    state = client["trainer"]
    log("resumed at " + ", ".join(f"{k} {state[k]}" for k in ("round", "epoch", "step") if k in state))
    return state


def stage_saver(args, stage, engine, run_dir, parts, fingerprint, extra=dict):
    """save(folder, metrics, **position): the stage checkpoint `<run_dir>/<folder>` (best/, final/) of the
    engine's model, written by rank 0. Its stage.json names the stage, the base model (`fingerprint`, taken
    before the engine partitions or casts it), --init, the position (epoch= or step=), the metrics, the
    arguments, and `extra()`: what a stage adds, read when it saves."""
    def save(folder, metrics, **position):
        if is_main():
            meta = dict(stage=stage, base_model=args.model, base_fingerprint=fingerprint, init=args.init, **position,
                        metrics=metrics, args=vars(args), prompt=args.prompt, answer=args.answer, **extra())
            save_stage(engine.module, os.path.join(run_dir, folder), parts, meta, gather_for_save(engine))
    return save


def keep_if_best(state, score, save, metrics, best="best_dice", **position):
    """best/ = the best validated model, the starting one (position 0) included: a stage never ends below
    its start. When `score` beats `state[best]`: records it and the position (`best_epoch` or `best_step`),
    saves best/, returns True."""
    if not score > state[best]:
        return False
    state[best] = score
    state.update({f"best_{k}": v for k, v in position.items()})
    save("best", metrics, **position)
    return True


def finish_run(run_dir, logger, t_start, info, *done_lines):
    """The end every training run shares, after its final/: training_info.json (`info` + wall time,
    world size, versions, the checkpoints' paths), the closing lines, logs and processes closed."""
    if is_main():
        write_json(os.path.join(run_dir, "training_info.json"), dict(
            info, wall_time_s=time.time() - t_start, world_size=dist.get_world_size() if dist.is_initialized() else 1,
            versions=versions(), checkpoints=dict(best=os.path.join(run_dir, "best"),
                                                  final=os.path.join(run_dir, "final"))))
    for line in done_lines:
        logger.line(line)
    logger.close()
    cleanup()
    return run_dir


def start_run(args, stage):
    """The setup every training script begins with: processes, seeds, run folder, logger.
    Returns (use_deepspeed, rank, world_size, device, run_dir, logger)."""
    deepspeed_on = use_deepspeed(args)
    if args.resume:  # before anything loads or is written
        check_resume_args(args.resume, args)
    rank, world_size, device = init_distributed(deepspeed_on)
    seed_everything(args.seed + rank)
    run_dir = make_run_dir(args.output, stage, args.resume)
    if is_main() and not args.resume:
        write_json(os.path.join(run_dir, ARGS_FILE), vars(args))
    logger = RunLogger(run_dir, enabled=is_main())
    logger.line(f"run folder: {run_dir}")
    return deepspeed_on, rank, world_size, device, run_dir, logger


class RunLogger:
    """One line per interval to stdout and `train.log`, one JSON record per line to
    `metrics.jsonl`, TensorBoard scalars when tensorboard is installed. Silent off rank 0."""

    def __init__(self, run_dir, enabled=True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.log = open(os.path.join(run_dir, "train.log"), "a")
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            pass

    def line(self, text):
        if self.enabled:
            print(text, flush=True)
            self.log.write(text + "\n")
            self.log.flush()

    def record(self, step, metrics):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(dict(step=step, time=time.time(), **metrics)) + "\n")
        self.jsonl.flush()
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.log.close()
            self.jsonl.close()
            if self.writer:
                self.writer.close()


def finite_or_zero(loss, params, state, max_bad_steps, log):
    """`loss` when finite. Otherwise a zero over the same parameters, so every rank still runs
    the same backward/step count; counts `state["bad_steps"]` and stops past `max_bad_steps`."""
    if torch.isfinite(loss):
        return loss
    state["bad_steps"] += 1
    log(f"non-finite loss at step {state['step']} ({state['bad_steps']} so far); step skipped")
    if state["bad_steps"] > max_bad_steps:
        raise RuntimeError(f"{state['bad_steps']} non-finite losses (> --max_bad_steps); stopping. "
                           f"Lower --lr, or check the data")
    return sum(p.sum() for p in params) * 0.0


def mean_over_ranks(window):
    """{key: mean} of a list of dicts of floats, pooled over every rank's list (each dict weighs one;
    a key some dicts lack is averaged over the dicts that have it). Every rank must call it, and
    gets the same result: logged metrics are the run's, not rank 0's share of the data."""
    sums, counts = {}, {}
    for record in window:
        for k, v in record.items():
            sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
    total, n = {}, {}
    for part_sums, part_counts in all_gather_objects((sums, counts)):
        for k, v in part_sums.items():
            total[k], n[k] = total.get(k, 0.0) + v, n.get(k, 0) + part_counts[k]
    return {k: total[k] / n[k] for k in total}


def log_train_window(logger, step, prefix, window, seconds, optimizer_steps, samples, lr):
    """The interval's log line and record: `window` is a list of per-micro-step dicts of floats;
    writes `prefix | <term> <mean> ... | lr | s/step samples/s | GPU GiB` and train/<term>, the
    means over every rank's window (call it on every rank)."""
    avg = mean_over_ranks(window)
    gib = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    logger.line(f"{prefix} | " + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
                + f" | lr {lr:.2e} | {seconds / max(1, optimizer_steps):.2f} s/step "
                f"{samples / max(seconds, 1e-9):.1f} samples/s | {gib:.1f} GiB")
    logger.record(step, {f"train/{k}": v for k, v in avg.items()} | {"train/lr": lr})
    return avg


def versions():
    import peft
    import transformers
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__)
