"""TRP hook: projection rank and energy, the nuclear sub-gradient, end to end through
``factorize{lossless=true}``, and DDP (2 gloo processes)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import graphprune as gp
from graphprune.passes.factorize import singular_values, to_matrix
from graphprune.training.trp import TRP, energy_rank, recalibrate_bn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _kept_energy(w: torch.Tensor, layout: str, r: int) -> tuple[int, float]:
    s = singular_values(to_matrix(w.detach(), layout))
    rank = int((s > s[0] * 1e-5).sum())
    return rank, float(s[:r].pow(2).sum() / s.pow(2).sum())


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_rank_and_energy(scheme: str) -> None:
    torch.manual_seed(0)
    model = Net()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in ("conv1", "conv2", "fc")}
    trp = TRP(model, energy=0.8, every=3, scheme=scheme)
    assert not trp.before_forward(1)
    assert trp.before_forward(3)
    layouts = {"conv1": scheme, "conv2": scheme, "fc": "linear"}
    for name, r in trp.ranks.items():
        w = model.get_submodule(name).weight
        full = min(to_matrix(w, layouts[name]).shape)
        assert r is not None and 1 <= r < full
        rank, _ = _kept_energy(w, layouts[name], r)
        assert rank <= r
        # the kept energy of the original weight at rank r is >= energy, and r is minimal
        s = singular_values(to_matrix(before[name], layouts[name]))
        e = s.pow(2) / s.pow(2).sum()
        assert float(e[:r].sum()) >= 0.8 - 1e-9
        assert float(e[: r - 1].sum()) < 0.8


def test_energy_rank_hand() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.6) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_nuclear_subgradient_hand() -> None:
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():  # W = U diag(3, 2, 1) V^T with a rotation in the columns
        c, s = 0.6, 0.8
        v = torch.tensor([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        lin.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ torch.eye(3, 4) @ v.T)
    model = nn.Sequential(lin)
    trp = TRP(model, energy=0.9, lam=0.5, every=1)
    trp.project()
    assert trp.ranks == {"0": 2}
    expected_w = torch.diag(torch.tensor([3.0, 2.0, 0.0])) @ torch.eye(3, 4) @ v.T
    torch.testing.assert_close(lin.weight.detach(), expected_w, atol=1e-6, rtol=0)
    lin.weight.grad = torch.ones(3, 4)
    trp.after_backward()
    expected = torch.ones(3, 4) + 0.5 * (torch.diag(torch.tensor([1.0, 1.0, 0.0])) @ torch.eye(3, 4) @ v.T)
    torch.testing.assert_close(lin.weight.grad, expected, atol=1e-6, rtol=0)
    fresh = TRP(model, energy=0.9, lam=0.5, every=1, subgradient="fresh")
    fresh.project()
    lin.weight.grad = None
    fresh.after_backward()
    torch.testing.assert_close(lin.weight.grad, expected - torch.ones(3, 4), atol=1e-6, rtol=0)


def _train(model: nn.Module, trp: TRP, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x = torch.randn(8, 3, 10, 10, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        trp.before_forward(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        trp.after_backward()
        opt.step()


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_end_to_end_lossless_factorize(scheme: str) -> None:
    torch.manual_seed(1)
    model = Net()
    trp = TRP(model, energy=0.6, lam=1e-3, every=2, scheme=scheme, layers=["conv2", "fc"])
    _train(model, trp, 5)
    calib = [torch.randn(8, 3, 10, 10) for _ in range(3)]
    trp.finalize(calib)
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    graph = gp.trace(model, x)
    result = gp.run(graph, f"factorize{{lossless=true,scheme={scheme}}}")
    assert result.modified
    slim = result.graph.to_module()
    with torch.no_grad():
        a, b = slim(x), model(x)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(graph).macs
    ranks = {rec["layer"]: rec["rank"] for rec in result.results[0].records}
    assert ranks["conv2"] <= trp.ranks["conv2"]


def test_untrained_model_is_not_factorized() -> None:
    """The control for the end-to-end test: without TRP the lossless pass finds nothing."""
    torch.manual_seed(1)
    model = Net().eval()
    result = gp.run(gp.trace(model, torch.randn(2, 3, 10, 10)), "factorize{lossless=true}")
    assert not result.modified


def test_recalibrate_bn_matches_batch_statistics() -> None:
    torch.manual_seed(2)
    model = Net()
    x = torch.randn(16, 3, 10, 10) * 3 + 1
    recalibrate_bn(model, [x[:8], x[8:]])
    mean = model.conv1(x).mean((0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, mean.detach(), atol=1e-5, rtol=1e-5)
    assert model.bn1.momentum == 0.1


# ------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model)
        trp = TRP(ddp, energy=0.7, lam=1e-3, every=2)
        # make the ranks diverge before the first projection: the broadcast must undo it
        with torch.no_grad():
            model.conv2.weight.add_(0.01 * rank)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for step in range(4):
            x = torch.randn(4, 3, 8, 8, generator=gen)
            y = torch.randint(0, 10, (4,), generator=gen)
            trp.before_forward(step)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            trp.after_backward()
            opt.step()
        trp.project()
        torch.save({"state": model.state_dict(), "ranks": trp.ranks}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["ranks"] == r1["ranks"]
    for key, value in r0["state"].items():
        if key.endswith(("conv1.weight", "conv2.weight", "fc.weight")):
            assert torch.equal(value, r1["state"][key]), key
    w = r0["state"]["conv2.weight"]
    rank, _ = _kept_energy(w, "channel", r0["ranks"]["conv2"])
    assert rank <= r0["ranks"]["conv2"]
