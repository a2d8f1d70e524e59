"""Mamba blocks: one parameterization, two execution paths.

A selective SSM keeps a state h of fixed size and updates it with input-dependent parameters
(Gu & Dao, "Mamba", 2023, Alg. 2; Dao & Gu, "Transformers are SSMs" (Mamba-2), 2024, Sec. 7):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t x_t        y_t = C_t . h_t + D * x_t
That fixed-size h is exactly what MQAR stresses: every key-value pair must fit in it.

Mamba2 (default) has a scalar A per head; Mamba1 has A per channel and state. The parameter
names and initialization follow mamba-ssm (`mamba_ssm/modules/mamba2.py`, `mamba_simple.py`), so a
state dict moves between our module and theirs, and between our two paths:
  reference  pure PyTorch, the spec: the SSD chunked form for Mamba2, a parallel scan for Mamba1.
  kernel     the fused mamba-ssm / causal-conv1d CUDA and Triton kernels, imported lazily
             (on a CPU-only machine `import mamba_ssm` fails, so nothing here needs it).

Shape letters:  B batch, L sequence length, D d_model, E d_inner = 2 D, H heads, P head dim,
N d_state, K conv width, R dt rank (Mamba1), C chunks, T chunk length.
"""
import functools
import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Impl = Literal["auto", "reference", "kernel"]
HEADDIM = 64  # Mamba2's P, mamba-ssm's default
D_CONV = 4  # K
EXPAND = 2  # E = EXPAND * D
REF_CHUNK = 64  # T of the reference SSD; any T gives the same function
KERNEL_CHUNK = 256  # mamba-ssm's default chunk for its SSD kernel
NORM_EPS = 1e-5  # Mamba2's gated RMSNorm


@functools.cache
def kernels() -> dict[str, Callable] | None:
    """The fused ops by mixer, or None where they cannot be imported (no CUDA build, no GPU stack).
    Each takes its mixer's tensors in a fixed order, out_proj's weight last, and does in_proj's
    output -> conv -> scan -> gate (-> norm) -> out_proj in one autograd function."""
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return None

    def mamba1(xz, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, out_w):  # (B, 2E, L) -> (B, L, D)
        return mamba_inner_fn(xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_w, None, A, None, None, D,
                              delta_bias=dt_bias, delta_softplus=True)

    def mamba2(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w):  # (B, L, E + E+2N + H) -> (B, L, D)
        return mamba_split_conv1d_scan_combined(
            zxbcdt, conv_w, conv_b, dt_bias, A, D, KERNEL_CHUNK, activation="silu", rmsnorm_weight=norm_w,
            rmsnorm_eps=NORM_EPS, outproj_weight=out_w, headdim=HEADDIM, ngroups=1, norm_before_gate=False)

    return {"mamba1": mamba1, "mamba2": mamba2}


def fused_mixer(kind: str, *args: torch.Tensor) -> torch.Tensor:
    """Mixer `kind`'s fused kernel. Eager, mamba-ssm's autograd function runs as it is. Dynamo
    cannot trace into its Triton/CUDA code, and compiling around it costs a graph break per layer
    (bench.py measured that slower than eager), so under torch.compile it goes through the custom
    op below, which the graph holds as one opaque node (torch.library.custom_op, PyTorch >= 2.4).

    The caller casts the matmul weights to the activations' dtype, which is what mamba-ssm does
    itself under autocast; so the op's output dtype is its input's, with autocast on or off."""
    if torch.compiler.is_compiling():
        return fused_mixer_op(kind, list(args))
    return kernels()[kind](*args)


@torch.library.custom_op("align_mamba::fused_mixer", mutates_args=())
def fused_mixer_op(kind: str, args: list[torch.Tensor]) -> torch.Tensor:
    with torch.autocast("cuda", enabled=False):  # the inputs are cast already (fused_mixer)
        return kernels()[kind](*args)


@fused_mixer_op.register_fake
def _(kind, args):  # the output's shape and dtype, for tracing: (B, L, D)
    x, out_w = args[0], args[-1]
    length = x.shape[1] if kind == "mamba2" else x.shape[2]  # mamba1 takes xz as (B, 2E, L)
    return x.new_empty(x.shape[0], length, out_w.shape[0])


@torch.library.custom_op("align_mamba::fused_mixer_backward", mutates_args=())
def fused_mixer_backward_op(kind: str, args: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """Every input's gradient. The forward op kept only its inputs, so this runs the forward again
    with autograd on and then mamba-ssm's backward: one more forward kernel per layer and step.
    A custom op's body runs below the autograd dispatch keys; the two guards let it record the
    recomputed forward (private torch API, present in 2.11 and 2.13; the GPU tests exercise it)."""
    keys = torch._C.DispatchKey
    with (torch.enable_grad(), torch.autocast("cuda", enabled=False),
          torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False),
          torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False)):
        args = [a.detach().requires_grad_() for a in args]
        return [g.contiguous() for g in torch.autograd.grad(kernels()[kind](*args), args, grad)]


@fused_mixer_backward_op.register_fake
def _(kind, args, grad):
    return [a.new_empty(a.shape) for a in args]


def _save_inputs(ctx, inputs, output):
    ctx.kind = inputs[0]
    ctx.save_for_backward(*inputs[1])


def _backward(ctx, grad):
    return None, fused_mixer_backward_op(ctx.kind, list(ctx.saved_tensors), grad)


fused_mixer_op.register_autograd(_backward, setup_context=_save_inputs)


def check_impl(impl: Impl, device: torch.device) -> None:
    """Fail before any work when `--impl kernel` cannot run here."""
    if impl == "kernel" and (device.type != "cuda" or kernels() is None):
        raise ValueError("--impl kernel needs a CUDA device with mamba_ssm and causal_conv1d "
                         "installed; use --impl auto or --impl reference")


def use_kernel(impl: Impl, x: torch.Tensor) -> bool:
    return impl != "reference" and x.is_cuda and kernels() is not None


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def init_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """A bias b with softplus(b) log-uniform in [dt_min, dt_max] (Mamba, Sec. 3.6 / App. D)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp(min=1e-4))


def no_decay(p: nn.Parameter) -> nn.Parameter:
    """Mark an SSM parameter that weight decay must not pull towards zero (mamba-ssm's convention)."""
    p._no_weight_decay = True
    return p


def causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Depthwise causal convolution then SiLU: output t sees inputs t-K+1..t only,
    y_t = bias + sum_k w_k * x_{t-K+1+k}. Written as K shifted multiply-adds rather than
    F.conv1d: the same function, which torch.compile fuses with the SiLU (one generated kernel each
    way in its CPU output), where PyTorch's own depthwise kernels were 54% of the 7-layer
    composite step's GPU time (bench.py --profile, README); on one H100 that step went from
    15.24 to 11.45 ms. Under bf16 autocast it computes in float32, the weights' dtype, where
    autocast ran F.conv1d in bf16."""
    L, K = x.shape[1], conv.kernel_size[0]
    x = F.pad(x, (0, 0, K - 1, 0))  # (B, K-1+L, channels): K-1 zeros before the first token
    w = conv.weight.squeeze(1).T  # (K, channels): conv.weight is (channels, 1, K)
    y = sum((x[:, k:k + L] * w[k] for k in range(K)), conv.bias)  # (B, L, channels), from the bias
    return F.silu(y)


# ---------------------------------------------------------------------------------------------
# Reference scans. Both run in at least float32 with autocast off: the state is a long product of
# decays, and bf16 would lose it (the kernels also accumulate in fp32). float64 stays float64, which
# is how the tests hold them to a step-by-step recurrence.

def upcast(*ts: torch.Tensor):
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in ts]


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for j <= i, and -inf above.

    exp(segsum(dt*A)) is the decay from step j to step i: Mamba-2's 1-semiseparable mask (Sec. 6).
    Summing a masked copy (not subtracting cumsums) keeps it exact when the sums are large.
    """
    T = a.shape[-1]
    a = a[..., :, None].expand(*a.shape, T)  # (..., T, T) row k holds a[k] in every column
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    out = a.masked_fill(~strictly_lower, 0).cumsum(dim=-2)  # out[i, j] = sum of a[k] for j < k <= i
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~lower, -torch.inf)


def ssd_reference(x, dt, A, B, C, chunk: int = REF_CHUNK):
    """Mamba-2's SSD scan in its chunked form (Mamba-2 paper Sec. 6, `ssd_minimal.py`).

    x (B, L, H, P), dt (B, L, H) after softplus, A (H,) negative, B and C (B, L, N) -> y (B, L, H, P).
    Within a chunk the SSM is a masked attention-like matrix product; between chunks only the
    states (B, H, P, N) are passed on, so the cost is linear in L.
    """
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = upcast(x, dt, A, B, C)
        b, L, H, P = x.shape
        chunk = min(chunk, L)
        pad = -L % chunk  # zero steps appended at the end cannot change earlier outputs (causal)
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        c, T = (L + pad) // chunk, chunk
        x = (x * dt[..., None]).view(b, c, T, H, P)  # discretized input dt_t x_t (the B_t is applied below)
        B, C = B.view(b, c, T, -1), C.view(b, c, T, -1)  # (b, c, T, N)
        a = (dt * A).view(b, c, T, H).permute(0, 3, 1, 2)  # (b, H, c, T) log decays dt_t * A
        a_cum = a.cumsum(dim=-1)  # (b, H, c, T)

        # 1. Within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1}+...+a_i) x_j
        decay = torch.exp(segsum(a))  # (b, H, c, T, T)
        scores = torch.einsum("bcin,bcjn->bcij", C, B)[:, None] * decay  # (b, H, c, T, T)
        y_diag = torch.einsum("bhcij,bcjhp->bcihp", scores, x)  # (b, c, T, H, P)

        # 2. The state each chunk leaves behind, as if it had started from zero. Only chunks 0..c-2 hand
        #    theirs on: the last one's is never read (we return no final state). For a sequence that fits
        #    in one chunk (the composite task's 8 tokens) steps 2-4 work on empty tensors: no state is built.
        decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, T)
        states = torch.einsum("bcjn,bhcj,bcjhp->bchpn",
                              B[:, :-1], decay_to_end[:, :, :-1], x[:, :-1])  # (b, c-1, H, P, N)

        # 3. The state entering chunk z = 1..c-1: each earlier chunk k's, decayed over chunks k+1..z-1,
        #    again as a segsum-masked product, now over the chunks' total log decays.
        chunk_decay = torch.exp(segsum(a_cum[..., :-1, -1]))  # (b, H, c-1, c-1), row z-1 for chunk z
        states = torch.einsum("bhzk,bkhpn->bzhpn", chunk_decay, states)  # (b, c-1, H, P, N)

        # 4. What each position of chunks 1..c-1 reads from the state that entered its chunk; chunk 0
        #    starts from zero and reads nothing.
        y_off = torch.einsum("bcin,bchpn,bhci->bcihp",
                             C[:, 1:], states, torch.exp(a_cum[:, :, 1:]))  # (b, c-1, T, H, P)
        y = y_diag + F.pad(y_off, (0, 0, 0, 0, 0, 0, 1, 0))  # (b, c, T, H, P): zeros for chunk 0
        return y.reshape(b, c * T, H, P)[:, :L]  # (B, L, H, P)


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 with h_0 = 0, in log2(L) parallel steps.

    Hillis & Steele (1986): after the step with offset k, position t holds the composition of the
    2k updates ending at t. Composing (a1, b1) then (a2, b2) gives (a2 a1, a2 b1 + b2).
    """
    L, k = a.shape[1], 1
    while k < L:
        b = torch.cat([b[:, :k], a[:, k:] * b[:, :-k] + b[:, k:]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def selective_scan_reference(u, dt, A, B, C):
    """Mamba-1's selective scan (Mamba paper, Alg. 2, zero-order hold with the Euler B of Sec. 3.5).

    u, dt (B, L, E) with dt after softplus; A (E, N) negative; B, C (B, L, N) -> y (B, L, E), no D term.
    Materializes the state at every step, (B, L, E, N): fine for a reference, which is why the kernel
    (which keeps it in SRAM) exists.
    """
    with torch.autocast(u.device.type, enabled=False):
        u, dt, A, B, C = upcast(u, dt, A, B, C)
        decay = torch.exp(dt[..., None] * A)  # (B, L, E, N) exp(dt A)
        drive = (dt * u)[..., None] * B[:, :, None, :]  # (B, L, E, N) dt B u
        h = linear_scan(decay, drive)  # (B, L, E, N)
        return torch.einsum("blen,bln->ble", h, C)  # (B, L, E)


# ---------------------------------------------------------------------------------------------

class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm, y = RMSNorm(y * silu(z)) (mamba-ssm `RMSNormGated`, norm_before_gate=False)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        return F.rms_norm(y * F.silu(z), (y.shape[-1],), self.weight, NORM_EPS)


class Mamba2(nn.Module):
    """Mamba-2 mixer (SSD) with one group of B, C: mamba-ssm's `Mamba2` with ngroups=1."""

    def __init__(self, d_model: int, d_state: int, impl: Impl = "auto"):
        super().__init__()
        self.impl = impl
        self.d_inner = EXPAND * d_model
        self.d_state = d_state
        self.nheads = self.d_inner // HEADDIM
        conv_dim = self.d_inner + 2 * d_state  # x, B and C all pass through the short convolution
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=False)  # [z, xBC, dt]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, D_CONV, groups=conv_dim, padding=D_CONV - 1)
        self.dt_bias = no_decay(nn.Parameter(init_dt(self.nheads)))
        self.A_log = no_decay(nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log()))  # A in -[1, 16]
        self.D = no_decay(nn.Parameter(torch.ones(self.nheads)))
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u):  # (B, L, D) -> (B, L, D)
        zxbcdt = self.in_proj(u)  # (B, L, E + E+2N + H)
        A = -torch.exp(self.A_log.float())  # (H,)
        if use_kernel(self.impl, u):
            return fused_mixer("mamba2", zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
                               A, self.D, self.norm.weight, self.out_proj.weight.to(zxbcdt.dtype))
        b, L, _ = u.shape
        z, xBC, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], dim=-1)
        x, B, C = causal_conv(xBC, self.conv1d).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        x = x.view(b, L, self.nheads, HEADDIM)  # (B, L, H, P)
        y = ssd_reference(x, dt, A, B, C) + self.D[:, None] * x  # (B, L, H, P)
        y = self.norm(y.reshape(b, L, self.d_inner).to(z.dtype), z)  # (B, L, E)
        return self.out_proj(y)


class Mamba1(nn.Module):
    """Mamba-1 mixer (selective scan): mamba-ssm's `Mamba` (`mamba_simple.py`)."""

    def __init__(self, d_model: int, d_state: int, impl: Impl = "auto"):
        super().__init__()
        self.impl = impl
        self.d_inner = EXPAND * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)  # [x, z]
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, D_CONV, groups=self.d_inner, padding=D_CONV - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)  # [dt, B, C]
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt(self.d_inner))
        self.dt_proj.bias._no_reinit = True  # the model's generic init zeroes other biases
        # S4D-real initialization A_n = -(n+1) (Gu et al., "On the Parameterization ... of Diagonal SSMs").
        self.A_log = no_decay(nn.Parameter(torch.arange(1, d_state + 1).float().log().repeat(self.d_inner, 1)))
        self.D = no_decay(nn.Parameter(torch.ones(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u):  # (B, L, D) -> (B, L, D)
        xz = self.in_proj(u)  # (B, L, 2E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        if use_kernel(self.impl, u):
            return fused_mixer("mamba1", xz.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                               self.x_proj.weight.to(xz.dtype), self.dt_proj.weight.to(xz.dtype), A,
                               self.D.float(), self.dt_proj.bias.float(), self.out_proj.weight.to(xz.dtype))
        x, z = xz.chunk(2, dim=-1)  # (B, L, E) each
        x = causal_conv(x, self.conv1d)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, E)
        y = selective_scan_reference(x, dt, A, B, C) + self.D * x  # (B, L, E)
        return self.out_proj((y * F.silu(z)).to(z.dtype))


def make_mixer(ssm: Literal["mamba2", "mamba1"], d_model: int, d_state: int, impl: Impl) -> nn.Module:
    return {"mamba2": Mamba2, "mamba1": Mamba1}[ssm](d_model, d_state, impl)


class Bidirectional(nn.Module):
    """Two scans for an encoder, which sees the whole input: one forward, one over the reversed
    sequence, summed (as in Vision Mamba / Caduceus), so every position hears from both sides."""

    def __init__(self, fwd: nn.Module, bwd: nn.Module):
        super().__init__()
        self.fwd, self.bwd = fwd, bwd

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        return self.fwd(x) + self.bwd(x.flip(1)).flip(1)


class Residual(nn.Module):
    """Pre-norm residual around any mixer: x + dropout(mixer(RMSNorm(x), *context))."""

    def __init__(self, d_model: int, mixer: nn.Module, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, *context):  # (B, L, D) -> (B, L, D)
        return x + self.dropout(self.mixer(self.norm(x), *context))


def mamba_block(ssm, d_model: int, d_state: int, impl: Impl, dropout: float,
                bidirectional: bool = False) -> Residual:
    mixer = make_mixer(ssm, d_model, d_state, impl)
    if bidirectional:
        mixer = Bidirectional(mixer, make_mixer(ssm, d_model, d_state, impl))
    return Residual(d_model, mixer, dropout)
