"""What PopulationMLP and PopulationResNet18 share: stacked layers and the member <-> solo state mapping.

Layout (the contract the training step relies on): every parameter and buffer of a fused module is
(G, *solo_shape), member first, G = members in that fused group, in the solo orientation (a Linear weight is
(G, out, in)). So `tensor[i]` is member i's own tensor, a penalty or weight-decay rule on solo tensors with
>= 2 dims becomes `p.dim() - member_dims >= 2`, and a fused module's state_dict keys are the solo net's.

Why it is exact: members share no parameter and the loss is a sum of per-member losses, so
d(sum_k L_k)/d(theta_m) = dL_m/d(theta_m) and elementwise optimizers (SGD, Adam, AdamW) update each member as if
it trained alone. Only float summation order inside the batched kernels differs (~1e-6 relative). The dropout
family's noise too: member m draws each mask on its own rows, with the call and shape its solo run makes, from its own
stream of torch's generator seeded as the solo run seeds it each epoch (MemberStreams), so its masks are its solo
run's, whichever members share its population.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from reglab.data.loader import epoch_seed
from reglab.population.sweeper import DROPCONNECT_WHY, FUSED_DROPCONNECT
from reglab.regularization.dropout import ClassicDropout, DropConnectLinear, GaussianDropout, InvertedDropout

# Parameter-free modules that act on each element alone: on a stacked (G, B, W) or grouped (B, G*C, ...)
# activation every element, hence every member, draws its own noise.
ELEMENTWISE = (nn.Identity, nn.Dropout, ClassicDropout, InvertedDropout, GaussianDropout)
LINEARS = (nn.Linear, DropConnectLinear)


def stack_members(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class MemberStreams:
    """Each member's own stream of torch's generator: a solo run reseeds the global generator at each training
    epoch's start with epoch_seed(seed, epoch, rank) (Classifier.on_train_epoch_start) and its only draws from it are
    its dropout-family masks, in forward order; `member(m)` swaps member m's state in for one draw, so the population
    replays every member's solo sequence. Until `start` (a population trained without its members' seeds, in tests),
    draws come from the global generator, member after member."""

    def __init__(self, members: int):
        self.seeds: list[int] | None = None  # the members' run seeds
        self._states: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * members
        self._epoch: tuple[int, int] = (0, 0)

    def start(self, epoch: int, rank: int) -> None:
        self._epoch, self._states = (epoch, rank), [None] * len(self._states)

    @contextlib.contextmanager
    def member(self, m: int, device: torch.device) -> Iterator[None]:
        if self.seeds is None:
            yield
            return
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            state = self._states[m]
            if state is None:  # what torch.manual_seed(seed) at the epoch's start gives the solo run, on this device
                seed = epoch_seed(self.seeds[m], *self._epoch)
                torch.default_generator.manual_seed(seed)
                if cuda:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            else:
                torch.set_rng_state(state[0])
                if cuda:
                    torch.cuda.set_rng_state(state[1], device)
            yield
            self._states[m] = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)


class MemberDraws(nn.Module):
    """A dropout-family module of the solo nets applied member by member in training, each under its own stream:
    x (G, B, ...) stacked, or (B, G*C, ...) grouped (`grouped`: a conv population's channels). In evaluation (no
    draws) it acts on the whole stacked tensor at once. No state of its own: state_dict keys stay the solo net's."""

    def __init__(self, module: nn.Module, streams: MemberStreams, members: list[int], grouped: bool = False):
        super().__init__()
        self.module, self.members, self.grouped = module, list(members), grouped
        self._streams = streams  # shared with the population (not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or isinstance(self.module, nn.Identity):
            return self.module(x)
        rows = x.unflatten(1, (len(self.members), -1)) if self.grouped else x
        # Elementwise masks are drawn in memory order: each member's slice in the layout its solo run's maps have
        # (channels_last on a GPU), or the same seed draws other masks.
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous() else torch.contiguous_format
        outs = []
        for i, m in enumerate(self.members):
            with self._streams.member(m, x.device):
                outs.append(self.module((rows[:, i] if self.grouped else rows[i]).contiguous(memory_format=layout)))
        if not self.grouped:
            return torch.stack(outs)
        return torch.stack(outs, 1).flatten(1, 2).contiguous(memory_format=layout)


class StackedLinear(nn.Module):
    """G Linear (or DropConnectLinear) layers: (G, B, in) -> (G, B, out). weight (G, out, in), bias (G, out)."""

    def __init__(self, linears: list[nn.Linear], streams: MemberStreams | None = None, members: list[int] = ()):
        super().__init__()
        self.weight = nn.Parameter(stack_members([lin.weight for lin in linears]))
        self.bias = nn.Parameter(stack_members([lin.bias for lin in linears])) if linears[0].bias is not None else None
        self.keep_prob = getattr(linears[0], "keep_prob", None)  # DropConnect (Wan et al. 2013), else None
        # DropConnect's masks: row i is member members[i], drawn from its stream (MemberStreams)
        self._streams, self.members = streams, list(members) or list(range(len(linears)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.keep_prob is not None:
            # DropConnectLinear's semantics per member: one Bernoulli(p) mask per step over each member's own
            # (out, in) weight; evaluation uses the mean network p * W; the bias is never masked.
            if not self.training:
                w = w * self.keep_prob
            elif self.keep_prob < 1.0:
                w = w * self._masks(w)
        if x.dim() == 2:
            # One (B, in) batch read by all members: a single (B, in) @ (in, G*out) product, x is not copied.
            G, out, fan_in = w.shape
            y = F.linear(x, w.reshape(G * out, fan_in), None if b is None else b.reshape(-1))
            return y.view(len(x), G, out).transpose(0, 1)
        if not torch.is_grad_enabled():
            # Evaluation: y = b + x W^T as (G, B, in) @ (G, in, out), read in place from the strided (G, B, in) view
            # the layer before leaves (a shared test batch); at batch 1000 this ran 10-25% faster on a CPU than the
            # transposed product below, or one GEMM per member, from width 64 to 256.
            wt = w.transpose(1, 2)
            return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)
        # Computed transposed, y^T = b + W x^T (G, out, B): the weight gradient dy^T x then comes out (G, out, in),
        # the parameter's own layout, instead of a transposed view that autograd copies into place each step.
        xt = x.transpose(1, 2)
        yt = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
        return yt.transpose(1, 2)

    def _masks(self, w: torch.Tensor) -> torch.Tensor:
        # Each member's (out, in) mask by DropConnectLinear's own call, under its stream: its solo run's mask.
        masks = []
        for i, m in enumerate(self.members):
            with (self._streams.member(m, w.device) if self._streams else contextlib.nullcontext()):
                masks.append(torch.bernoulli(torch.full_like(w[i], self.keep_prob)))
        return torch.stack(masks)

    def extra_repr(self) -> str:
        G, out, fan_in = self.weight.shape
        dc = "" if self.keep_prob is None else f", keep_prob={self.keep_prob:g}"
        return f"members={G}, in_features={fan_in}, out_features={out}, bias={self.bias is not None}{dc}"


class StackedBatchNorm(nn.Module):
    """G BatchNorms on (N, G*C, *): channel block g belongs to member g (Ioffe & Szegedy 2015). Batch statistics
    and running statistics are per channel, hence each member's own, in training and in evaluation.
    weight, bias, running_mean, running_var (G, C); num_batches_tracked (G,)."""

    def __init__(self, norms: list[nn.BatchNorm1d | nn.BatchNorm2d]):
        super().__init__()
        self.eps, self.momentum = norms[0].eps, norms[0].momentum
        self.weight = nn.Parameter(stack_members([n.weight for n in norms]))
        self.bias = nn.Parameter(stack_members([n.bias for n in norms]))
        self.register_buffer("running_mean", stack_members([n.running_mean for n in norms]))
        self.register_buffer("running_var", stack_members([n.running_var for n in norms]))
        self.register_buffer("num_batches_tracked", stack_members([n.num_batches_tracked for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        # view(-1) shares storage, so F.batch_norm's in-place running-stat update lands in the (G, C) buffers.
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                            self.bias.view(-1), self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        G, C = self.weight.shape
        return f"members={G}, num_features={C}, eps={self.eps:g}, momentum={self.momentum:g}"


def member_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(M, B, C) logits, (M, B) labels -> (M,) each member's mean cross-entropy; their sum is the loss to
    backpropagate (each member then gets exactly its own gradient)."""
    # Classes on dim 1: on a CPU, log_softmax over a last dim of 10 classes measured ~8x slower than over dim 1. And
    # contiguous: over the transposed view of a (35, 1000, 10) test batch cross_entropy took 2.2 ms, over a copy
    # 0.25 + 0.63 ms (equal at batch 100; 2-core Xeon VM, 2026-12-02).
    return F.cross_entropy(logits.transpose(1, 2).contiguous(), targets, reduction="none").mean(1)


def member_rows(values: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """{name: (M,) tensor} -> M dicts {name: value}, member m's at [m], read from the device in one transfer."""
    table = torch.stack([v.float() for v in values.values()]).tolist()  # rows: names, columns: members
    return [dict(zip(values, column)) for column in zip(*table)]


# --- what must agree between members -------------------------------------------------------------------------
def describe(module: nn.Module) -> str:
    """A slot's identity as far as fusing goes: type, keep_prob and DropConnect's options (a Linear's size may
    differ by width)."""
    if isinstance(module, nn.Linear):
        keep = getattr(module, "keep_prob", None)
        args = ([] if keep is None else [f"keep_prob={keep:g}"]) + ([] if module.bias is not None else ["bias=False"])
        if isinstance(module, DropConnectLinear):
            args += [f"mask={module.mask}", f"inference={module.inference}"]
        return type(module).__name__ + (f"({', '.join(args)})" if args else "")
    return repr(module)


def norm_settings(module: nn.Module) -> str:
    """A norm layer's settings apart from its size; only the standard ones (affine, running stats) fuse."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not (module.affine and module.track_running_stats) or module.momentum is None:
            return f"nonstandard {module!r}"
        return f"eps={module.eps:g}, momentum={module.momentum:g}"
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.bias is None:
            return f"nonstandard {module!r}"
        return f"eps={module.eps:g}"
    return ""


def common_reason(nets: list[nn.Module], kind: type, signature, norm_kind,
                  fusable_norms: tuple[str, ...]) -> str | None:
    """What stops `nets` (all of class `kind`) from being fused, checked alike for every model: no members, another
    class, a difference between members (`signature(net)` -> dict), or a normalization that is not fused."""
    if not nets:
        return "no members to fuse"
    for net in nets:
        if type(net) is not kind:
            return f"{type(net).__name__} is not a reglab {kind.__name__}"
    reason = first_difference([signature(net) for net in nets])
    if reason:
        return reason
    norm = norm_kind(nets[0])
    if norm not in fusable_norms:
        return f"model.norm={norm} cannot be fused (fusable: {', '.join(fusable_norms)})"
    return None


def first_difference(signatures: list[dict[str, object]]) -> str | None:
    """The first field (in insertion order) where a member differs from member 0, as a reason."""
    first = signatures[0]
    for m, sig in enumerate(signatures[1:], 1):
        for key, value in first.items():
            if sig.get(key) != value:
                return f"member {m} has {key}={sig.get(key)}, member 0 has {value}: they cannot be fused"
    return None


def slot_reason(slots: dict[str, nn.Module], allowed: tuple[type, ...]) -> str | None:
    for name, module in slots.items():
        if type(module) not in allowed:
            return f"{name}={describe(module)} cannot be fused"
        if isinstance(module, DropConnectLinear) and (module.mask, module.inference) != FUSED_DROPCONNECT:
            return f"{name}={describe(module)} cannot be fused: {DROPCONNECT_WHY}"
    return None


# --- the population surface ------------------------------------------------------------------------------------
class Population(nn.Module):
    """M solo nets fused; forward(x) -> (M, B, classes). Subclasses say where member m lives (`_locate`)."""

    member_dims = 1  # every parameter and buffer is (G, *solo_shape)

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.members = len(nets)
        # The solo modules, not registered (their tensors are not this module's state): member_nets() copies the
        # current weights back into them.
        self._nets = list(nets)
        self.streams = MemberStreams(len(nets))  # the members' dropout-family draws (MemberDraws, StackedLinear)
        self._member_index: dict[tuple[int, torch.device], torch.Tensor] = {}  # member_index's, per tensor and device

    def _locate(self, m: int) -> tuple[nn.Module, int]:
        """(fused module whose state_dict keys are the solo net's, member m's index in its tensors), 0 <= m < M."""
        raise NotImplementedError

    def _member(self, m: int) -> tuple[nn.Module, int]:
        if not -self.members <= m < self.members:
            raise IndexError(f"member {m} out of range: the population has {self.members}")
        return self._locate(m % self.members)

    def member_index(self, p: torch.Tensor) -> torch.Tensor:
        """(G,) on p's device: the member that row p[i] of one of this population's parameters or buffers belongs
        to, so that per-row values become per-member ones by `index_add` (a penalty, max-norm's count) and per-member
        values reach their rows by indexing (a strength)."""
        key = (id(p), p.device)
        if key not in self._member_index:
            rows: dict[int, int] = {}
            for m in range(self.members):
                module, i = self._locate(m)
                if any(t is p for t in module.state_dict(keep_vars=True).values()):
                    rows[i] = m
            if sorted(rows) != list(range(len(p))):
                raise ValueError(f"a tensor of shape {tuple(p.shape)} is not one of this population's fused tensors")
            self._member_index[key] = torch.tensor([rows[i] for i in range(len(p))], device=p.device)
        return self._member_index[key]

    def member_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        module, i = self._member(m)
        return {k: v[i].clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def load_member_state_dict(self, m: int, state: dict[str, torch.Tensor]) -> None:
        module, i = self._member(m)
        own = module.state_dict()  # detached tensors sharing storage with the parameters and buffers
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise KeyError(f"member {m} state dict: missing keys {missing}, unexpected keys {unexpected}")
        for key, value in own.items():
            if value[i].shape != state[key].shape:
                raise ValueError(f"member {m} state dict: {key} has shape {tuple(state[key].shape)}, "
                                 f"the member's is {tuple(value[i].shape)}")
            value[i].copy_(state[key])

    def member_nets(self) -> list[nn.Module]:
        for m, net in enumerate(self._nets):
            net.load_state_dict(self.member_state_dict(m))
        return list(self._nets)
