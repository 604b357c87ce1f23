"""nanokor's Muon against torch.optim.Muon: one process bit for bit; 2 and 3 gloo ranks, whole tensors
(DDP after its all-reduce) and FSDP2-style row shards, with matrix counts and row counts that do not
divide evenly, bit for bit too (and in fp32 against one process); each matrix orthogonalized by exactly one rank; the owners balanced;
the per-step hyperparameters that Optimizers.set_step sets reach the partitioned steps."""

import itertools
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanokor.config import load_config, model_config
from nanokor.model import Transformer
from nanokor.muon import Muon, newton_schulz, newton_schulz_cost, partition
from nanokor.optim import build_optimizer

# Seven matrices: wide, tall, square, and row counts (5, 2) that 2 and 3 ranks cannot shard evenly.
SHAPES = [(48, 32), (32, 48), (32, 32), (64, 16), (16, 16), (5, 24), (2, 8)]
# Per step and group: (lr, momentum, weight_decay), as schedules would set them between steps.
SETTINGS = [[(0.05, 0.9, 0.1), (0.02, 0.95, 0.0)], [(0.04, 0.8, 0.05), (0.03, 0.9, 0.2)],
            [(0.01, 0.95, 0.1), (0.05, 0.5, 0.1)]]


def make_params(seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def grads_for(step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(shape, generator=g) for shape in SHAPES]
    if step == 1:
        grads[2] = None  # a matrix without a gradient this step is skipped, by every rank alike
    return grads


def groups_of(params) -> list[dict]:
    # Two groups with their own settings; the second without Nesterov and with Moonshot's lr scaling.
    return [{"params": params[:4]},
            {"params": params[4:], "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}]


def run_steps(optimizer, params, set_grad, steps=3):
    for step in range(steps):
        for group, (lr, momentum, wd) in zip(optimizer.param_groups, SETTINGS[step]):
            group.update(lr=lr, momentum=momentum, weight_decay=wd)
        for p, g in zip(params, grads_for(step)):
            p.grad = None if g is None else set_grad(p, g)
        optimizer.step()


def reference() -> tuple[list[torch.Tensor], dict]:
    """torch.optim.Muon itself, one process."""
    params = [torch.nn.Parameter(t) for t in make_params()]
    opt = torch.optim.Muon(groups_of(params), adjust_lr_fn="original")
    run_steps(opt, params, lambda p, g: g.clone())
    return [p.detach() for p in params], opt.state_dict()


def assert_same_state(mine: dict, theirs: dict):
    assert mine["param_groups"] == theirs["param_groups"]  # the layout a checkpoint holds, key for key
    assert mine["state"].keys() == theirs["state"].keys()
    for k in theirs["state"]:
        assert torch.equal(mine["state"][k]["momentum_buffer"], theirs["state"][k]["momentum_buffer"])


def test_one_process_equals_torch_muon_bit_for_bit():
    params = [torch.nn.Parameter(t) for t in make_params()]
    opt = Muon(groups_of(params), adjust_lr_fn="original")
    run_steps(opt, params, lambda p, g: g.clone())
    want, state = reference()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, want))
    assert_same_state(opt.state_dict(), state)
    # ...and a checkpoint of one loads into the other
    again = torch.optim.Muon(groups_of([torch.nn.Parameter(t) for t in make_params()]), adjust_lr_fn="original")
    again.load_state_dict(opt.state_dict())


def test_newton_schulz_cost_counts_flops():
    assert newton_schulz_cost((768, 3072)) == newton_schulz_cost((3072, 768)) == 4 * 768**2 * 3072 + 2 * 768**3


def test_partition_is_balanced_by_cost_not_by_count():
    # base.py's blocks: 4 square matrices and 3 with 4x the elements, whose Newton-Schulz costs 3x as much
    costs = [newton_schulz_cost(s) for s in [(768, 768)] * 4 + [(3072, 768), (3072, 768), (768, 3072)]] * 12
    for world in (2, 3, 8, 64):
        owners = partition(costs, world)
        load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        # LPT's bound: the heaviest rank is within 4/3 of the optimum, which is at least both of these
        assert max(load) <= 4 / 3 * max(sum(costs) / world, max(costs))
        assert owners == partition(costs, world)  # deterministic: every rank computes the same owners
    for costs in ([5, 4, 3, 3, 3], [7, 7, 6, 6, 5, 4, 4, 3], [1] * 7):  # against every assignment
        for world in (2, 3):
            best = min(max(sum(c for c, r in zip(costs, a) if r == k) for k in range(world))
                       for a in itertools.product(range(world), repeat=len(costs)))
            owners = partition(costs, world)
            assert max(sum(c for c, r in zip(costs, owners) if r == k) for k in range(world)) <= 4 / 3 * best


def _worker(rank: int, world: int, store: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for sharded in (False, True):
            _check_partitioned_step(rank, world, sharded)
    finally:
        dist.destroy_process_group()


def _check_partitioned_step(rank: int, world: int, sharded: bool):
    calls = []

    def counted(update, group):  # which matrices this rank orthogonalizes
        calls.append(tuple(update.shape))
        return newton_schulz(update, group)

    if sharded:  # FSDP2's layout: rows split as torch.chunk, DTensors on a 1-D mesh
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        shard = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
        full = lambda t: t.full_tensor()  # noqa: E731
    else:  # whole tensors, identical on every rank: DDP after its all-reduce
        shard, full = torch.clone, (lambda t: t)
    params = [torch.nn.Parameter(shard(t)) for t in make_params()]
    set_grad = lambda p, g: shard(g)  # noqa: E731
    opt = Muon(groups_of(params), adjust_lr_fn="original", orthogonalize=counted)
    run_steps(opt, params, set_grad)
    want, state = reference()
    assert all(torch.equal(full(p.detach()), w) for p, w in zip(params, want)), f"rank {rank}: weights differ"
    mine = opt.state_dict()
    for s in mine["state"].values():
        s["momentum_buffer"] = full(s["momentum_buffer"])
    assert_same_state(mine, state)
    # Each matrix is orthogonalized once per step, by its owner alone.
    everyone = [None] * world
    dist.all_gather_object(everyone, calls)
    owners = partition([newton_schulz_cost(s) for s in SHAPES], world)
    for r in range(world):
        expected = [s for i, s in enumerate(SHAPES) if owners[i] == r] * 3
        if owners[2] == r:  # matrix 2 had no gradient at step 1
            expected.remove(SHAPES[2])
        assert sorted(everyone[r]) == sorted(expected)

    # fp32 Newton-Schulz (optim.ns_dtype on a CPU without bf16 units) against one process's: the rows travel
    # to their owner in fp32 too, which a bf16 exchange would round first (a ~1% weight drift in 4 steps).
    # With NorMuon and cautious decay too: NorMuon's row statistics are each row's own, so a shard keeps
    # its rows' state (saved and resharded like the momentum); only the norms are summed over the ranks,
    # in another order than one process sums them (last-bit differences).
    alone = dist.new_subgroups(group_size=1)[0]
    for extra in ({}, {"normuon_beta2": 0.9, "cautious_wd": True}):
        split, whole = ([torch.nn.Parameter(f(t)) for t in make_params()] for f in (shard, torch.clone))
        opt = Muon(groups_of(split), adjust_lr_fn="original", ns_dtype=torch.float32, **extra)
        run_steps(opt, split, set_grad)
        one = Muon(groups_of(whole), adjust_lr_fn="original", ns_dtype=torch.float32, process_group=alone, **extra)
        run_steps(one, whole, lambda p, g: g.clone())
        same = torch.equal if not (extra and sharded) else partial(torch.allclose, rtol=0, atol=1e-6)
        assert all(same(full(p.detach()), q.detach()) for p, q in zip(split, whole)), f"rank {rank}: {extra}"
        for p, q in zip(split, whole):
            if extra and p.grad is not None:
                assert same(full(opt.state[p]["normuon_buffer"]), one.state[q]["normuon_buffer"])

    # Fewer matrices than ranks: a rank that owns none still takes part in the exchange.
    few, ref = ([torch.nn.Parameter(f(t)) for t in make_params()[:world - 1]] for f in (shard, torch.clone))
    for p, q, g in zip(few, ref, grads_for(0)):
        p.grad, q.grad = shard(g), g.clone()
    Muon(few, lr=0.05).step()
    torch.optim.Muon(ref, lr=0.05).step()
    assert all(torch.equal(full(p.detach()), q.detach()) for p, q in zip(few, ref))


@pytest.mark.parametrize("world", [2, 3])
def test_partitioned_muon_equals_torch_muon_bit_for_bit(world, tmp_path):
    """Whole tensors (DDP after its all-reduce), then FSDP2's row shards, in the same processes."""
    mp.start_processes(_worker, args=(world, str(tmp_path / "store")), nprocs=world, start_method="fork")


# Muon's per-step values from set_step: noam with warmup 1 (the rate falls as step^-0.5), Muon's own
# cooldown over the last 2 of 4 steps (AdamW's is off), momentum 0.5 -> 0.9 over 2 steps, decay linear to 0.
SET_STEP_FLAGS = ["--optimizer=muon", "--n_layer=1", "--n_head=2", "--d_model=16", "--d_ff=24", "--block_size=8",
                  "--schedule=noam", "--warmup_steps=1", "--max_steps=4", "--cooldown_frac=0",
                  "--muon_cooldown_frac=0.5", "--muon_lr=0.03", "--muon_momentum_warmup=2",
                  "--muon_momentum_start=0.5", "--muon_momentum=0.9", "--weight_decay=0.1",
                  "--weight_decay_schedule=linear", "--muon_ns_dtype=bf16"]  # torch.optim.Muon's dtype


def expected_muon_values(step: int) -> dict:
    """The formulas, written out: lr, momentum and weight decay of Muon's groups at `step` of 4."""
    return {"lr": 0.03 * step ** -0.5 * {1: 1, 2: 1, 3: 2 / 3, 4: 1 / 3}[step],
            "momentum": 0.5 + 0.4 * min(step / 2, 1), "weight_decay": 0.1 * (1 - step / 4)}


def _set_step_worker(rank: int, world: int, store: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for sharded in (False, True):
            _check_set_step_reaches_the_partitioned_step(sharded)
    finally:
        dist.destroy_process_group()


def _check_set_step_reaches_the_partitioned_step(sharded: bool):
    cfg = load_config(SET_STEP_FLAGS)
    torch.manual_seed(0)
    model = Transformer(model_config(cfg, vocab_size=32))
    if sharded:  # as FSDPEngine builds it: every block, then the root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for unit in (*model.layers, model):
            fully_shard(unit, mesh=mesh)
        shard, full = (lambda t: distribute_tensor(t, mesh, [Shard(0)])), (lambda t: t.full_tensor())
    else:
        shard, full = torch.clone, (lambda t: t)
    optimizers = build_optimizer(model, cfg)
    muon = optimizers.optimizers["muon"]
    assert isinstance(muon, Muon)  # the partitioned optimizer, whichever engine holds the weights
    params = [p for group in muon.param_groups for p in group["params"]]
    reference = [torch.nn.Parameter(full(p.detach()).clone()) for p in params]
    torch_muon = torch.optim.Muon(reference, nesterov=True, adjust_lr_fn="original")
    g = torch.Generator().manual_seed(7)
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, grad in zip(params, reference, grads):
            p.grad, q.grad = shard(grad), grad.clone()
        optimizers.set_step(step)
        muon.step()
        for group in torch_muon.param_groups:
            group.update(expected_muon_values(step))
        torch_muon.step()
    assert all(torch.equal(full(p.detach()), q.detach()) for p, q in zip(params, reference))


def test_set_step_reaches_the_partitioned_muon(tmp_path):
    """Momentum warmup, Muon's own cooldown and a decay schedule, set by Optimizers.set_step, are what the
    partitioned steps use on 2 ranks (whole tensors, then FSDP2 shards): equal to torch.optim.Muon given
    the same values from the formulas."""
    mp.start_processes(_set_step_worker, args=(2, str(tmp_path / "store")), nprocs=2, start_method="fork")
