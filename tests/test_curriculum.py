"""--curriculum area (large vessels first, growing subsets, then everything) and --curriculum off
(the default): the training order each gives, sharded over ranks as DDP needs it."""
import math
import random
import types

import torch

import train_hard
import train_sft
from common.data import AreaCurriculum, ShardedSampler, area_curriculum, padding

AREAS = [0.05, 0.30, 0.10, 0.20, 0.01, 0.25, 0.15, 0.02, 0.08]  # frame i's vessel area
BY_AREA = [1, 5, 3, 6, 2, 8, 0, 7, 4]  # frame indices, largest vessel area first
GROUPS = [BY_AREA[0:3], BY_AREA[3:6], BY_AREA[6:9]]  # 3 phases: large, medium, thin


def test_area_curriculum_grows_from_the_largest_vessels():
    curriculum = AreaCurriculum(dict(enumerate(AREAS)), phases=3, epochs=3)
    for epoch, phase in enumerate([1, 2, 3]):
        order = curriculum.arrange(range(len(AREAS)), epoch, random.Random(epoch))
        assert curriculum.phase(epoch) == phase
        # group by group, largest vessels first; each group whole, in some (shuffled) order
        assert [sorted(order[3 * g:3 * g + 3]) for g in range(phase)] == [sorted(g) for g in GROUPS[:phase]]
        assert len(order) == 3 * phase
    # fewer epochs than phases: the last epoch still trains on everything
    assert [AreaCurriculum(dict(enumerate(AREAS)), 3, 2).phase(e) for e in range(2)] == [1, 3]
    assert [AreaCurriculum(dict(enumerate(AREAS)), 3, 5).phase(e) for e in range(5)] == [1, 1, 2, 2, 3]


def test_sharded_curriculum_keeps_every_rank_in_step():
    curriculum = AreaCurriculum(dict(enumerate(AREAS)), phases=3, epochs=3)
    for world_size in (1, 2, 4):
        for epoch in range(3):
            shards = []
            for rank in range(world_size):
                sampler = ShardedSampler(len(AREAS), rank, world_size, seed=5, curriculum=curriculum)
                sampler.set_epoch(epoch)
                shards.append(list(sampler))
                assert len(sampler) == len(shards[-1]) == math.ceil(3 * (epoch + 1) / world_size)
            assert set().union(*shards) == set(sum(GROUPS[:epoch + 1], []))  # every frame of the phase, no other
            group_of = {i: g for g, group in enumerate(GROUPS) for i in group}
            padded = len(shards[0]) * world_size > 3 * (epoch + 1)  # then a rank's last item may repeat the first
            for shard in shards:  # each rank's own order goes from large to thin vessels
                groups = [group_of[i] for i in (shard[:-1] if padded else shard)]
                assert groups == sorted(groups)


def test_off_is_the_order_before_the_curriculum():
    """Default off: the seeded permutation, padding and stride the sampler always had, bit for bit."""
    for size, world_size, epoch, start in [(9, 1, 0, 0), (10, 3, 2, 1), (3, 8, 1, 0), (17, 2, 4, 3)]:
        g = torch.Generator().manual_seed(7 + epoch)
        before = torch.randperm(size, generator=g).tolist()
        per_rank = math.ceil(size / world_size)
        before += padding(before, per_rank * world_size - size)
        for rank in range(world_size):
            sampler = ShardedSampler(size, rank, world_size, shuffle=True, seed=7)
            sampler.set_epoch(epoch, start)
            assert list(sampler) == before[rank::world_size][start:]
            assert len(sampler) == per_rank - start and sampler.per_rank_at(epoch) == per_rank
    args = train_sft.parse_args(["--data", "x"])
    assert args.curriculum == "off" and area_curriculum([], args) is None
    assert train_hard.parse_args(["--data", "x", "--mine"]).curriculum == "off"


def test_hard_epochs_keep_frames_on_their_rank():
    args = types.SimpleNamespace(seed=0, augment=False, easy_ratio=0.0)
    hard = [0, 1, 2, 3, 5, 6, 8]
    curriculum = AreaCurriculum({i: AREAS[i] for i in hard}, phases=3, epochs=3)
    for epoch in range(3):
        shards = [train_hard.epoch_items(hard, [], args, 0, epoch, rank, 2, curriculum) for rank in range(2)]
        assert len(shards[0]) == len(shards[1])
        for rank, shard in enumerate(shards):
            assert {i for i, _ in shard} <= set(hard[rank::2])  # a frame's cached features live on its rank
        assert {i for shard in shards for i, _ in shard} == set(curriculum.select(hard, epoch))
    # off: the epoch items are unchanged by the new argument
    assert train_hard.epoch_items(hard, [4, 7], args, 0, 1, 1, 2) == train_hard.epoch_items(hard, [4, 7], args, 0, 1, 1,
                                                                                               2, None)


def test_sft_trains_the_curriculum_schedule(synth_data, tmp_path):
    """12 train frames, 3 phases over 3 epochs, batch 4: 1 + 2 + 3 optimizer steps (off: 3 + 3 + 3)."""
    run = train_sft.main(train_sft.parse_args([
        "--data", synth_data, "--output", str(tmp_path), "--curriculum", "area", "--epochs", "3", "--batch_size", "4",
        "--max_train_samples", "12", "--max_val_samples", "2", "--num_workers", "0", "--lora_preset", "small",
        "--lr", "1e-3", "--log_every", "1"]))
    log = open(f"{run}/train.log").read()
    assert "6 optimizer steps; curriculum: 3 phases over 3 epochs, largest vessels first: 4 / 8 / 12 frames" in log
    assert "step 6/6" in log and "step 7/" not in log
