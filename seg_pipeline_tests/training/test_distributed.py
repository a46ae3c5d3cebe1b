"""DDP test: two CPU ranks with gloo train through ``fit`` and must see disjoint data and end identical."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from seg_pipeline.settings import LoopSettings
from seg_pipeline.training import distributed
from seg_pipeline.training.trainer import fit

SAMPLES = 24
WORLD = 2
EPOCHS = 2


class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def _collate(items: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    images, masks, indices = (torch.stack(column) for column in zip(*items, strict=True))
    return {"image": images, "mask": masks, "index": indices, "item_id": [str(int(i)) for i in indices]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Uneven split: rank 0 reads 15 samples (5 batches), rank 1 reads 9 (3 batches).
UNEVEN_SPLIT = 15


def _rank_main(rank: int, port: int, out_dir: str, uneven: bool = False) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = distributed.init_distributed(timeout_s=120)
    try:
        assert (info.rank, info.world_size, info.backend) == (rank, WORLD, "gloo")
        torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's weights
        model = _SmallConvNet()
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(SAMPLES, 3, 8, 8, generator=generator)
        dataset = TensorDataset(images, images.argmax(dim=1), torch.arange(SAMPLES))
        if uneven:  # what whole-shard partitioning can give: one rank has more batches
            part = range(UNEVEN_SPLIT) if rank == 0 else range(UNEVEN_SPLIT, SAMPLES)
            loader = DataLoader(Subset(dataset, list(part)), batch_size=3, collate_fn=_collate)
        else:
            sampler = DistributedSampler(
                dataset, num_replicas=distributed.world_size(), rank=distributed.rank(), seed=5
            )
            loader = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=_collate)
        seen: dict[int, list[int]] = {}
        evaluated_on: list[int] = []

        def objective(net: nn.Module, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict]:
            seen.setdefault(epoch, []).extend(batch["index"].tolist())
            return F.cross_entropy(net(batch["image"]), batch["mask"]), {}

        def evaluate(net: nn.Module, val_loader: Any) -> dict[str, float]:
            evaluated_on.append(distributed.rank())
            return {"miou": 0.5}

        lines: list[str] = []
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = LoopSettings(
            epochs=EPOCHS, device="cpu", amp=False, grad_accum_steps=2, ema_decay=0.9, log_every_n_steps=1
        )
        result = fit(
            model,
            objective,
            loader,
            None,
            evaluate,
            optimizer,
            None,
            config,
            Path(out_dir) / "ckpt",
            log_fn=lines.append,
        )
        torch.save(
            {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "seen": seen,
                "evaluated_on": evaluated_on,
                "lines": lines,
                "train_images": [h["train/images"] for h in result.history],
                "best_score": result.best_score,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        distributed.cleanup()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_see_disjoint_data_and_end_with_identical_weights(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for epoch in range(1, EPOCHS + 1):
        first, second = (set(r["seen"][epoch]) for r in ranks)
        assert not first & second
        assert first | second == set(range(SAMPLES))
    assert ranks[0]["seen"][1] != ranks[0]["seen"][2]  # set_epoch reshuffled
    # Parameters are identical; BatchNorm running stats are per-rank (DDP re-broadcasts rank 0's
    # buffers before each forward), so the checkpoint holds rank 0's.
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    assert ranks[0]["evaluated_on"] == [0, 0] and ranks[1]["evaluated_on"] == []
    assert ranks[0]["lines"] and ranks[1]["lines"] == []  # only rank 0 logs
    assert ranks[0]["train_images"] == ranks[1]["train_images"] == [float(SAMPLES)] * EPOCHS  # all-reduced
    assert ranks[1]["best_score"] == 0.5  # metrics broadcast from rank 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "best.pt",
        "final.pt",
        "last.pt",
        "metrics.csv",
        "run_manifest.json",
    ]
    saved = torch.load(tmp_path / "ckpt" / "final.pt", weights_only=True)
    resumable = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)  # RNG states live in last.pt
    assert saved["world_size"] == WORLD and len(resumable["rng"]) == WORLD
    for key, value in ranks[0]["state"].items():
        assert torch.equal(saved["model"][key], value)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ranks_with_uneven_batch_counts_stay_in_lockstep_instead_of_hanging(tmp_path: Path) -> None:
    """5 batches on rank 0, 3 on rank 1, 2-step accumulation: both ranks stop after 3 batches.

    Without the lockstep, rank 0's 4th backward pass waits for gradients rank 1 never sends (a hang
    until the 120 s process-group timeout).
    """
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), True), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for epoch in range(1, EPOCHS + 1):
        assert len(ranks[0]["seen"][epoch]) == len(ranks[1]["seen"][epoch]) == 9  # 3 batches of 3 each
        assert set(ranks[1]["seen"][epoch]) == set(range(UNEVEN_SPLIT, SAMPLES))
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    assert ranks[0]["train_images"] == [18.0] * EPOCHS  # the surplus 6 samples of rank 0 are dropped
    saved = torch.load(tmp_path / "ckpt" / "final.pt", weights_only=True)
    assert saved["global_step"] == 2 * EPOCHS  # one full 2-batch group and one flushed batch per epoch


def test_single_process_helpers_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.is_distributed) == (0, 1, False)
    assert distributed.is_main_process() and distributed.rank() == 0 and distributed.world_size() == 1
    model = nn.Linear(2, 2)
    assert distributed.wrap_ddp(model) is model and distributed.unwrap_model(model) is model
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.init_distributed(backend="gloo")
