"""The training helpers under DistributedDataParallel: 2 CPU processes, gloo backend.

Each rank holds a different data shard, so without the reductions the KL scores, the
label-table rows and the BN statistics would differ between ranks.  Checked: every rank
takes the same pruning decision and the same EPI decision, the replicas (parameters,
buffers, label tables) stay identical, and masked weights stay zero.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_on_all_ranks(obj: object, what: str) -> None:
    got: list[object] = [None] * WORLD
    dist.all_gather_object(got, obj)
    assert all(g == got[0] for g in got), f"{what} differs between ranks: {got}"


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


def _check(rank: int) -> None:
    import graphprune as gp
    from graphprune.training import EarlyPruningIndicator, LabelRefinement, fit, recalibrate_bn

    from test_importance_data import ResNetTiny, _randomise_bn

    torch.manual_seed(0)  # same model on every rank
    teacher = _randomise_bn(ResNetTiny(c=8, n=4))
    gen = torch.Generator().manual_seed(100 + rank)  # a different shard per rank
    x = torch.randn(16, 3, 8, 8, generator=gen)
    graph = gp.trace(teacher, x[:1])

    # the decision: KL scores on each rank's shard, averaged over ranks
    result = gp.run(graph, "prune-channels{macs=0.5,criterion=kl}", data=x[:8])
    records = [(r["group"], sorted(map(tuple, ((k, tuple(v)) for k, v in r["kept"].items()))))
               for r in result.results[0].records]
    _same_on_all_ranks(records, "the kl pruning decision")
    from graphprune.training.criteria import kl_importance, taylor_importance

    groups = [g for g in gp.analyse(graph).groups if g.prunable.any()]
    for crit in (kl_importance(x[:8]), taylor_importance(x[:8])):
        _same_on_all_ranks([crit(graph, g).tolist() for g in groups], f"the {crit.__name__} scores")

    # projections are registered before wrapping in DDP
    student = DDP(result.results[0].projected_model(teacher))
    with torch.no_grad():
        t_logits_all = torch.zeros(32, 4)
    index = torch.arange(16) + 16 * rank  # this rank's rows of a 32-row table
    with torch.no_grad():
        t_logits_all[index] = teacher(x)
    dist.all_reduce(t_logits_all)  # every rank builds the same initial table
    refine = LabelRefinement(t_logits_all, lr=0.5)
    loader = [(x[i : i + 4], t_logits_all[index[i : i + 4]].argmax(1), index[i : i + 4]) for i in range(0, 16, 4)]
    epi = EarlyPruningIndicator(student, budget=0.4, criterion="l1", window=1, threshold=0.5, example=x[:1])
    fired: list[bool] = []
    fit(student, loader, epochs=2, lr=0.05, teacher=teacher, T=2.0, alpha=0.5, refinement=refine,
        hooks=[lambda e, m: fired.append(epi.step())])
    recalibrate_bn(student, [x[:8], x[8:]])
    _same_on_all_ranks(fired, "the EPI trigger")
    _same_on_all_ranks({g: m.tolist() for g, m in epi.decision.items()}, "the EPI decision")

    # replicas identical: parameters (incl. parametrization originals), buffers, label table
    state = {k: v.detach().clone() for k, v in student.module.state_dict().items()}
    for k, v in state.items():
        ref = v.clone()
        dist.broadcast(ref, src=0)
        assert torch.equal(ref, v), f"{k} differs between ranks"
    table = refine.table.clone()
    dist.broadcast(table, src=0)
    assert torch.equal(table, refine.table), "label tables differ between ranks"
    assert refine.steps == 8 and not torch.equal(refine.table, t_logits_all)

    # masked weights stay zero
    proj = result.results[0].projection
    module = student.module
    for key, mask in proj.masks.items():
        path, _, attr = key.rpartition(".")
        value = getattr(module.get_submodule(path), attr).detach()
        assert torch.all(value[mask == 0] == 0), f"{key}: masked entries are not zero"


def test_ddp_two_processes_take_the_same_decisions() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
