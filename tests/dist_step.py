"""Worker of tests/test_distributed.py (not a test itself): one SFT optimizer step on the tiny
model, on this process's share of a fixed list of frames, through the plain-torch engine
(which averages gradients over processes), then rank 0 saves the gradients the optimizer saw and the updated parameters.

    python tests/dist_step.py DATA OUT.pt FRAMES_PER_PROCESS     (RANK/WORLD_SIZE/... in the env)
"""
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import VesselDataset, build_splits  # noqa: E402
from common.engine import build_engine, cleanup, engine_step, init_distributed, is_main  # noqa: E402
from common.forward import forward_batch, full_size_logits  # noqa: E402
from common.lora import apply_lora, set_trainable  # noqa: E402
from common.losses import segmentation_loss  # noqa: E402
from common.sa2va import Sa2VAProcessor, describe, load_model  # noqa: E402

ADAM_EPS = 1.0
LR = 1e-3


def main(data, out, per_process):
    rank, world_size, device = init_distributed(False)
    model, tokenizer = load_model("tiny")
    apply_lora(model, 8, 16, dropout=0.0)  # no dropout: every process computes the same function
    set_trainable(model, ["lora", "text_hidden_fcs", "mask_decoder"])
    model.eval()
    train, _ = build_splits(data)
    frames = VesselDataset(train)
    mine = [frames[i] for i in range(rank * per_process, (rank + 1) * per_process)]
    batch = Sa2VAProcessor(describe(model, tokenizer), tokenizer)(mine)
    params = [p for p in model.parameters() if p.requires_grad]
    args = SimpleNamespace(lr=LR, weight_decay=0.0, warmup_ratio=0.0, grad_accum=1, grad_clip=1.0, bf16=False)
    engine = build_engine(model, params, args, 10, device, False, world_size)
    # AdamW's first step is lr * g / (|g| + eps): with the default eps 1e-8 it maps a float32
    # rounding difference in a near-zero gradient element to a parameter change of up to lr.
    # With eps = 1 the step is lr * g / (|g| + 1), whose slope in g is at most lr: two gradients
    # that agree to float32 rounding give parameters that agree to lr times that rounding.
    for group in engine.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    names = {id(p): n for n, p in model.named_parameters()}
    grads, optimizer_step = {}, engine.optimizer.step

    def step_and_keep_grads(*a, **k):  # the gradients the optimizer sees: averaged over processes, clipped
        grads.update({names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None})
        return optimizer_step(*a, **k)
    engine.optimizer.step = step_and_keep_grads
    out_ = forward_batch(model, batch)
    loss = segmentation_loss(full_size_logits(model, out_["low_res_logits"], batch["image_sizes"]),
                             [m.float() for m in batch["masks"]])["loss"]  # a mean over this process's frames
    engine.backward(loss)
    assert engine_step(engine)
    if is_main():
        torch.save(dict(params={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                        grads=grads), out)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
