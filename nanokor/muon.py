"""Muon with its Newton-Schulz work split across ranks: each rank orthogonalizes its own share of the
matrices and one collective shares the results.

`torch.optim.Muon` orthogonalizes every matrix on every rank, so under DDP its Newton-Schulz work (about
2.1 TFLOP a step at config/base.py's shape) is the same on each of 64 ranks while each rank's share of the
forward and backward shrinks 64-fold. Here the matrices are dealt to owners once, balanced by cost, and a
step is:

    1. momentum, on every rank, for every matrix (elementwise: the state stays whole and identical on
       every rank, so a checkpoint has torch.optim.Muon's layout and resumes at any world size);
    2. each owner orthogonalizes its matrices' Nesterov updates (`newton_schulz`, or any function
       passed as `orthogonalize`);
    3. one collective shares the orthogonalized updates, and every rank applies every update (NorMuon's
       row normalization and cautious weight decay, when asked for, are part of this elementwise step).

Parameters come in two kinds, and the collective follows:
  - whole tensors (one process, or DDP after its all-reduce): owners write their updates into one flat
    bf16 buffer, padded to the largest share, and one `all_gather` gives every rank all of them;
  - FSDP2's row-sharded DTensors: each rank computes the Nesterov update of its own rows, one
    `all_to_all` gathers each matrix's rows at its owner, and a second sends each rank the orthogonalized
    rows it holds (the owner gathers whole matrices, as Moonshot's and Dion's distributed Muon do).

The Nesterov rows travel to their owner in `ns_dtype`, the dtype Newton-Schulz computes in (it casts to
it first), and the orthogonalized updates travel back in bf16 (EXCHANGE_DTYPE), which every rank and a
single process round them to alike; so the split changes nothing: every op is torch.optim.Muon's, in its
order, and a step equals torch's bit for bit given the same gradients (tests/test_muon.py). One process
runs no collective at all.

Every hyperparameter (lr, momentum, weight_decay, nesterov, ns_*, eps, adjust_lr_fn) is read from the
param group at every step, as torch.optim.Muon does, so schedules may set any of them between steps.
"""

import math
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

EXCHANGE_DTYPE = torch.bfloat16  # newton_schulz's result (torch's dtype): bf16 NS loses nothing in the exchange
# all_gather_single is all_gather_into_tensor's name from PyTorch 2.13 on (the old one warns there).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def newton_schulz(update: torch.Tensor, group: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration, op for op as torch.optim.Muon runs it: in bf16,
    on the wide orientation, after scaling to unit Frobenius norm; X <- aX + (bA + cA^2)X with A = XX^T.
    Its result has the input's shape, singular values in ~[0.7, 1.2] and the input's singular vectors.
    (`dtype` fp32 is for CPUs without bf16 matmul units, which emulate bf16 slowly: optim.ns_dtype.)"""
    return _odd_quintics(update, [group["ns_coefficients"]] * group["ns_steps"], 1.0, group["eps"], dtype)


# Polar Express (Amsel, Persson, Musco & Gower, 2025, arXiv:2505.16932): five iterations of the same quintic
# form, each with its own coefficients, chosen so that the composition is the best odd polynomial
# approximation of sign() on the singular values after a normalization with a 2% safety margin (1.02);
# it drives small singular values to ~1 in fewer steps than the fixed coefficients above.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def polar_express(update: torch.Tensor, group: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """newton_schulz's iteration with Polar Express's per-step coefficients (group's ns_coefficients and
    ns_steps unused)."""
    return _odd_quintics(update, POLAR_EXPRESS, 1.02, group["eps"], dtype)


def _odd_quintics(update: torch.Tensor, coefficients, safety: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """X scaled to Frobenius norm 1/safety, then X <- aX + (bA + cA^2)X, A = XX^T, for each (a, b, c)."""
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() * safety).clamp(min=eps)  # not in place: update may already be a bf16 buffer
    for a, b, c in coefficients:
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def normuon(updates: list[torch.Tensor], second_moments: list[torch.Tensor], beta2: float,
            pg=None) -> list[torch.Tensor]:
    """NorMuon (Li et al., 2025, arXiv:2510.05491): each row (output neuron) of an orthogonalized update
    divided by the root of an EMA of its mean square (`second_moments`, updated in place), so that neurons
    move at a like rate; then rescaled to the update's own Frobenius norm, which keeps muon_lr's meaning and
    makes the EMA's bias correction moot. The updates may be this rank's rows of each matrix: `pg` then
    sums the norms over the ranks that hold the others, in one all_reduce for all matrices. Both norms
    come from the row mean squares (|scaled|^2 = cols * sum(ms / v)), so no scaled copy is kept."""
    rates, norms = [], []
    for update, v in zip(updates, second_moments):
        mean_square = update.float().square().mean(dim=1)
        v.lerp_(mean_square, 1 - beta2)
        rate = v.clamp(min=1e-20).rsqrt()
        rates.append(rate)
        norms.append(torch.stack([mean_square.sum(), (mean_square * rate.square()).sum()]) * update.size(1))
    norms = torch.stack(norms) if norms else torch.empty(0, 2)
    if pg is not None:
        dist.all_reduce(norms, group=pg)
    return [update.float() * (rate * (n[0] / n[1].clamp(min=1e-30)).sqrt())[:, None]
            for update, rate, n in zip(updates, rates, norms)]


def newton_schulz_cost(shape) -> int:
    """FLOPs of one Newton-Schulz iteration on a matrix of this shape: with s, l its smaller and larger
    side, X X^T and (bA + cA^2) X take 2 s^2 l each and A^2 takes 2 s^3."""
    s, l = sorted(shape[:2])
    return 4 * s * s * l + 2 * s ** 3


def partition(costs: list[int], world_size: int) -> list[int]:
    """The owner rank of each item: greedy longest-processing-time first (each item, costliest first,
    goes to the least-loaded rank; ties go to the lower index), whose heaviest rank is within 4/3 of the
    best possible. Deterministic, so every rank computes the same assignment on its own."""
    load, owners = [0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world_size), key=load.__getitem__)
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's shape scaling of the learning rate."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))  # every shape moves its weights alike
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon's algorithm, hyperparameters, state layout and checkpoints; its Newton-Schulz
    work partitioned over `process_group` (default: the whole world when torch.distributed is running)
    for whole tensors, or over the device mesh of FSDP2-sharded ones. See the module docstring."""

    def __init__(self, params, *, process_group=None, ns_dtype: torch.dtype = torch.bfloat16,
                 orthogonalize: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
                 normuon_beta2: float = 0.0, cautious_wd: bool = False, **kwargs):
        """Beyond torch.optim.Muon's arguments: `ns_dtype` what Newton-Schulz computes in; `orthogonalize`
        (update, group) -> orthogonalized update, newton_schulz in ns_dtype unless given; `normuon_beta2`
        > 0 applies NorMuon's per-row normalization with that EMA rate (`normuon`); `cautious_wd` decays
        only the weights that the update moves toward zero (Chen et al., 2025, arXiv:2510.12402)."""
        super().__init__(params, **kwargs)
        self.process_group, self.ns_dtype = process_group, ns_dtype
        self.orthogonalize = orthogonalize or partial(newton_schulz, dtype=ns_dtype)
        self.normuon_beta2, self.cautious_wd = normuon_beta2, cautious_wd
        self._owners: dict[int, int] = {}  # id(param) -> owner rank, for the parameter set in _owners_key
        self._owners_key: tuple = ()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not work:
            return loss
        sharded = isinstance(work[0][0], DTensor)
        if any(isinstance(p, DTensor) != sharded for p, _ in work):
            raise ValueError("Muon takes either whole tensors or FSDP2-sharded DTensors, not both at once.")
        pg, rank, world = self._group(work[0][0] if sharded else None)
        owners = self._assign(world)
        for p, group in work:  # 1. momentum, everywhere
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            _local(self.state[p]["momentum_buffer"]).lerp_(_local(p.grad), 1 - group["momentum"])
        # 2. orthogonalize each owner's share, 3. share the results
        exchange = self._exchange_shards if sharded else self._exchange_whole
        updates = exchange(work, [owners[id(p)] for p, _ in work], pg, rank, world)
        if self.normuon_beta2:
            for p, _ in work:
                if "normuon_buffer" not in self.state[p]:
                    self.state[p]["normuon_buffer"] = _row_state(p)
            updates = normuon(updates, [_local(self.state[p]["normuon_buffer"]) for p, _ in work],
                              self.normuon_beta2, pg if sharded else None)
        for (p, group), update in zip(work, updates):  # 4. apply, everywhere
            lr = float(group["lr"])
            param = _local(p)
            if self.cautious_wd:  # decay where the step (-update) and the decay (-param) agree in sign
                param.addcmul_(param, (update * param >= 0).to(param.dtype), value=-lr * group["weight_decay"])
            else:
                param.mul_(1 - lr * group["weight_decay"])
            param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss

    def _nesterov(self, p, group) -> torch.Tensor:
        """The update that is orthogonalized (of the local rows, for a sharded parameter)."""
        grad, buf = _local(p.grad), _local(self.state[p]["momentum_buffer"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _group(self, dtensor: DTensor | None):
        """(process group, rank, world size) that shares the work: a sharded parameter's mesh, else
        `process_group` or the default group; a single process when torch.distributed is not running."""
        if dtensor is not None:
            mesh = dtensor.device_mesh
            if mesh.ndim != 1 or tuple(dtensor.placements) != (Shard(0),):
                raise ValueError(f"Muon takes DTensors sharded by rows on a 1-D mesh (FSDP2's default); got "
                                 f"placements {dtensor.placements} on a {mesh.ndim}-D mesh.")
            group = mesh.get_group()
        elif self.process_group is not None:
            group = self.process_group
        elif dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        else:
            return None, 0, 1
        return group, dist.get_rank(group), dist.get_world_size(group)

    def _assign(self, world_size: int) -> dict[int, int]:
        """Owners of every parameter (with a gradient or not), assigned once per parameter set."""
        params = [p for group in self.param_groups for p in group["params"]]
        key = (world_size, *map(id, params))
        if key != self._owners_key:
            owners = partition([newton_schulz_cost(p.shape) for p in params], world_size)
            self._owners, self._owners_key = {id(p): r for p, r in zip(params, owners)}, key
        return self._owners

    def _exchange_whole(self, work, owners, pg, rank, world) -> list[torch.Tensor]:
        """Whole tensors: owners orthogonalize into their slice of a flat buffer; one all_gather."""
        sizes = [p.numel() for p, _ in work]
        offsets, share = [0] * len(work), [0] * world  # offset within the owner's slice; slice sizes
        for i, r in enumerate(owners):
            offsets[i], share[r] = share[r], share[r] + sizes[i]
        width = max(share)  # every slice padded to the largest share: all_gather wants equal sizes
        device = work[0][0].device
        mine = torch.empty(width, dtype=EXCHANGE_DTYPE, device=device)
        for i, (p, group) in enumerate(work):
            if owners[i] == rank:
                update = self.orthogonalize(self._nesterov(p, group), group)
                mine[offsets[i]:offsets[i] + sizes[i]].view(p.shape).copy_(update)
        everyone = mine
        if world > 1:
            everyone = torch.empty(world * width, dtype=EXCHANGE_DTYPE, device=device)
            _all_gather(everyone, mine, group=pg)
        return [everyone[r * width + o:r * width + o + n].view(p.shape)
                for (p, _), r, o, n in zip(work, owners, offsets, sizes)]

    def _exchange_shards(self, work, owners, pg, rank, world) -> list[torch.Tensor]:
        """FSDP2 row shards: all_to_all each matrix's rows to its owner, orthogonalize whole matrices
        there, all_to_all the orthogonalized rows back. Returns this rank's rows of every update."""
        rows = [_shard_rows(p, world, rank) for p, _ in work]  # rows[i][r]: rank r's rows of matrix i
        cols = [p.shape[1] for p, _ in work]
        # Out: my rows of every matrix, grouped by owner. In: each rank's rows of the matrices I own.
        sent = [sum(rows[i][rank] * cols[i] for i in range(len(work)) if owners[i] == r) for r in range(world)]
        got = [sum(rows[i][r] * cols[i] for i in range(len(work)) if owners[i] == rank) for r in range(world)]
        order = sorted(range(len(work)), key=owners.__getitem__)  # stable: parameter order within an owner
        # In ns_dtype: rounding them to bf16 here would add a rounding that fp32 Newton-Schulz does not make.
        out = torch.cat([self._nesterov(*work[i]).to(self.ns_dtype).flatten() for i in order])
        inbox = _all_to_all(out, got, sent, pg, world)
        # Reassemble my matrices from every rank's rows, orthogonalize, and cut the result into rows again.
        pieces = _split(inbox, [[rows[i][r] * cols[i] for i in order if owners[i] == rank] for r in range(world)])
        results = []
        for k, i in enumerate(i for i in order if owners[i] == rank):
            whole = torch.cat([pieces[r][k].view(rows[i][r], cols[i]) for r in range(world)])
            update = self.orthogonalize(whole, work[i][1]).to(EXCHANGE_DTYPE)
            results.append(update.split(rows[i]))
        back = torch.cat([t.flatten() for r in range(world) for t in (res[r] for res in results)]) if results \
            else out.new_empty(0, dtype=EXCHANGE_DTYPE)  # a rank that owns no matrix (more ranks than matrices)
        mine = _all_to_all(back, sent, got, pg, world)
        per_owner = _split(mine, [[rows[i][rank] * cols[i] for i in order if owners[i] == r] for r in range(world)])
        updates: list = [None] * len(work)
        for r in range(world):
            for piece, i in zip(per_owner[r], (i for i in order if owners[i] == r)):
                updates[i] = piece.view(rows[i][rank], cols[i])
        return updates


def _row_state(p: torch.Tensor) -> torch.Tensor:
    """Zeros, one per row of `p`: sharded by rows like `p` when it is a DTensor, so that a checkpoint saves
    and reshards it as it does the momentum."""
    if isinstance(p, DTensor):
        local = torch.zeros(p.to_local().shape[0], device=p.to_local().device)
        return DTensor.from_local(local, p.device_mesh, [Shard(0)], shape=(p.shape[0],), stride=(1,))
    return torch.zeros(p.shape[0], device=p.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage, so in-place ops update it), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _all_to_all(out: torch.Tensor, got: list[int], sent: list[int], group, world: int) -> torch.Tensor:
    """all_to_all_single: sent[r] elements of `out` go to rank r, got[r] arrive from it (none alone)."""
    if world == 1:
        return out
    inbox = torch.empty(sum(got), dtype=out.dtype, device=out.device)
    dist.all_to_all_single(inbox, out, got, sent, group=group)
    return inbox


def _shard_rows(p: DTensor, world: int, rank: int) -> list[int]:
    """Each rank's row count of a row-sharded parameter: torch.chunk's split, as FSDP2 shards."""
    n = p.shape[0]
    chunk = -(-n // world)
    rows = [max(0, min(chunk, n - r * chunk)) for r in range(world)]
    if rows[rank] != p.to_local().shape[0]:
        raise ValueError(f"a {tuple(p.shape)} parameter holds {p.to_local().shape[0]} rows on rank {rank}, not "
                         f"torch.chunk's {rows[rank]}: Muon expects FSDP2's even row sharding.")
    return rows


def _split(flat: torch.Tensor, sizes: list[list[int]]) -> list[list[torch.Tensor]]:
    """flat cut into consecutive pieces: sizes[r] lists the pieces of block r."""
    blocks = flat.split([sum(s) for s in sizes])
    return [list(block.split(s)) for block, s in zip(blocks, sizes)]
