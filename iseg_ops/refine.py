"""Iterative refinement (METHOD §3) with Ent-Self, as Triton kernels in the shape of
``shared/docs/KERNELS.md`` §2.

Folding property (METHOD §3): ``P = diag(w) T`` is row-stochastic, so any positive affine
normalisation of each iteration's input gives the same result, ``minmax(Pᴺ C₀)``. One call:

1. ``_col_max_kernel`` (one read of S): reciprocal column maxima.
2. ``_ent_self_kernel`` (one read of S, one write of T): the Eq. 7 numerators ``T`` (fp16 for
   fp16/bf16 input, fp32 for fp32 input, so fp32 keeps its 1e-5 accuracy) and fp32 row weights
   ``w`` (a row that the clamp empties falls back to ``T0`` with its own weight). With
   ``lam=None``, ``T`` is ``attn`` as given, except that bf16 ``attn`` is first rounded to an
   fp16 ``T`` by ``_to_fp16_kernel`` (so no product converts its tiles in its loop).
3. ``_refine_init_kernel``: ``Z₀ = C₀`` as zero-padded fp32 ``[B, HW, KP]`` (KP = max(16, next
   power of two of K)), the column (min, max) of ``C₀`` and ±inf for the later iterations' stats.
4. Per iteration, ``_refine_gemv_kernel``: ``Z = w ⊙ (T · X)`` with ``X`` = the previous ``Z``
   min-max normalised by its stats as it is loaded (KP ≤ 16) or by ``_refine_normalise_kernel``
   into an fp16/fp32 ``X`` just before (KP > 16), both operands fed to ``tl.dot``; the epilogue
   folds each column's min and max into the next stats with atomics (order-independent).
5. ``_refine_finish_kernel``: the last ``Z`` min-max normalised into ``cross.dtype``.

Launches: N + 4 for K ≤ 16 and 2N + 4 above (with ``lam=None``, two fewer, or one fewer for
bf16 ``attn``). No host synchronisation, no torch ops besides
allocations, so the op can be captured in a CUDA graph; batches whose ``T`` would exceed
:data:`CHUNK_BYTES` run in chunks. A column that is constant (within ``reference.FLAT``) at any
iteration becomes 0, as in the reference.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_t_max, use_triton, validate_refine
from ._triton import autotune_enabled, loop_bound, pick_config, shared_memory_limit, tl, triton
from .ent_self import transform

LAUNCHED_KERNELS = (
    "_to_fp16_kernel",
    "_refine_init_kernel",
    "_refine_gemv_kernel",
    "_refine_normalise_kernel",
    "_refine_finish_kernel",
)  # launched here, besides ent_self's two

CHUNK_BYTES = 1 << 30  # T of at most this many bytes at a time (32 MiB per image at HW = 4096)


@triton.jit
def _affine(stats_ptr, ks, flat, KP: tl.constexpr):
    """``(scale, shift)`` with ``x·scale + shift = (x - lo) / (hi - lo)`` for the columns ``ks``
    whose (lo, hi) sit at ``stats_ptr`` ([2, KP]); ``(0, 0)`` for a column constant within
    ``flat`` (METHOD §3: it becomes 0)."""
    lo = tl.load(stats_ptr + ks)
    hi = tl.load(stats_ptr + KP + ks)
    span = hi - lo
    has_span = span > tl.maximum(tl.abs(lo), tl.abs(hi)) * flat
    scale = tl.where(has_span, 1.0 / tl.where(has_span, span, 1.0), 0.0)
    return scale, -lo * scale


# One program: BLOCK_K columns of C₀ of one matrix, all HW rows (one read of those columns).
# Writes Z₀ (zero-padded fp32), stats[0] = that block's column (min, max) (0 for padding) and
# stats[1..ITERS] = (+inf, -inf).
@triton.jit
def _refine_init_kernel(
    c_ptr,
    z_ptr,
    stats_ptr,
    HW,
    K,
    NB,
    ITERS,
    stride_cb,
    stride_cq,
    stride_ck,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    rows = tl.arange(0, BLOCK_R)
    c_ptrs = c_ptr + pid_b * stride_cb + rows[:, None] * stride_cq + ks[None, :] * stride_ck
    z_ptrs = z_ptr + pid_b * HW * KP + rows[:, None] * KP + ks[None, :]
    lo = tl.full([BLOCK_R, BLOCK_K], float("inf"), tl.float32)
    hi = tl.full([BLOCK_R, BLOCK_K], float("-inf"), tl.float32)
    for r in range(0, loop_bound(HW), BLOCK_R):
        row_ok = (rows + r) < HW
        ok = row_ok[:, None] & k_ok[None, :]
        c = tl.load(c_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(z_ptrs, c, mask=row_ok[:, None])
        lo = tl.minimum(lo, tl.where(ok, c, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, c, float("-inf")))
        c_ptrs += BLOCK_R * stride_cq
        z_ptrs += BLOCK_R * KP
    stats = stats_ptr + pid_b * 2 * KP + ks
    tl.store(stats, tl.where(k_ok, tl.min(lo, axis=0), 0.0))
    tl.store(stats + KP, tl.where(k_ok, tl.max(hi, axis=0), 0.0))
    for i in range(1, loop_bound(ITERS) + 1):
        tl.store(stats + i * NB * 2 * KP, tl.full([BLOCK_K], float("inf"), tl.float32))
        tl.store(stats + i * NB * 2 * KP + KP, tl.full([BLOCK_K], float("-inf"), tl.float32))


# One program: BLOCK_M rows × BLOCK_K columns of Z = w ⊙ (T · X) for one matrix: one read of
# those rows of T, and X (from L2). PROLOGUE: X is the previous fp32 Z, min-max normalised by
# its stats as it is loaded; else X is ready (fp16, or fp32 when DOT_FP32). Stores Z (fp32) and
# folds its column (min, max) into z_stats with atomics.
@triton.jit
def _refine_gemv_kernel(
    t_ptr,
    w_ptr,
    x_ptr,
    x_stats_ptr,
    z_ptr,
    z_stats_ptr,
    HW,
    flat,
    stride_tb,
    stride_tq,
    stride_tk,
    HAS_W: tl.constexpr,
    PROLOGUE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < HW
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    if PROLOGUE:
        scale, shift = _affine(x_stats_ptr + pid_b * 2 * KP, ks, flat, KP)
    # Scalar bases moved by n and loop-invariant int32 offsets: fewer per-element address
    # instructions in the loop than a tensor of pointers advanced every step.
    t_base = t_ptr + pid_b * stride_tb + (pid_m * BLOCK_M).to(tl.int64) * stride_tq
    t_offs = tl.arange(0, BLOCK_M)[:, None] * stride_tq + cols[None, :] * stride_tk
    x_base = x_ptr + pid_b * HW * KP
    x_offs = cols[:, None] * KP + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n in range(0, loop_bound(HW), BLOCK_N):
        if EVEN:
            t = tl.load(t_base + n * stride_tk + t_offs)
            x = tl.load(x_base + n * KP + x_offs)
        else:
            col_ok = (cols + n) < HW
            t = tl.load(t_base + n * stride_tk + t_offs, mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            x = tl.load(x_base + n * KP + x_offs, mask=col_ok[:, None], other=0.0)
        if PROLOGUE:  # rows of X past HW meet zero columns of T: no mask needed
            x = x * scale[None, :] + shift[None, :]
        if DOT_FP32:
            acc = tl.dot(t.to(tl.float32), x.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(t.to(tl.float16), x.to(tl.float16), acc)

    if HAS_W:
        acc *= tl.load(w_ptr + pid_b * HW + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(z_ptr + pid_b * HW * KP + rows[:, None] * KP + ks[None, :], acc,
             mask=row_ok[:, None])
    stats = z_stats_ptr + pid_b * 2 * KP + ks
    tl.atomic_min(stats, tl.min(tl.where(row_ok[:, None], acc, float("inf")), axis=0))
    tl.atomic_max(stats + KP, tl.max(tl.where(row_ok[:, None], acc, float("-inf")), axis=0))


# One program: BLOCK_R rows × BLOCK_C columns of one matrix: T = S rounded to fp16 (lam=None on
# bf16 input: the product then multiplies fp16 tiles as for fp16 input, with no conversion in
# its loop; the same rounding it would otherwise apply to every tile, every iteration).
@triton.jit
def _to_fp16_kernel(
    s_ptr, t_ptr, HW, stride_sb, stride_sq, stride_sk, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < HW)[:, None] & (cols < HW)[None, :]
    s = tl.load(s_ptr + pid_b * stride_sb + rows[:, None] * stride_sq + cols[None, :] * stride_sk,
                mask=mask)
    tl.store(t_ptr + pid_b * HW * HW + rows[:, None] * HW + cols[None, :], s.to(tl.float16),
             mask=mask)


# One program: BLOCK_R rows of one matrix: X = Z min-max normalised by its stats, in x's dtype.
@triton.jit
def _refine_normalise_kernel(
    z_ptr, stats_ptr, x_ptr, HW, flat, KP: tl.constexpr, BLOCK_R: tl.constexpr
):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, KP)
    scale, shift = _affine(stats_ptr + pid_b * 2 * KP, ks, flat, KP)
    offs = pid_b * HW * KP + rows[:, None] * KP + ks[None, :]
    mask = (rows < HW)[:, None]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0) * scale[None, :] + shift[None, :]
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


# One program: BLOCK_R rows of one matrix: out = (Z - lo) / (hi - lo) in out's dtype (0 for a
# constant column), the first K of the KP columns.
@triton.jit
def _refine_finish_kernel(
    z_ptr,
    stats_ptr,
    out_ptr,
    HW,
    K,
    flat,
    stride_ob,
    stride_oq,
    stride_ok,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, KP)
    lo = tl.load(stats_ptr + pid_b * 2 * KP + ks)
    hi = tl.load(stats_ptr + pid_b * 2 * KP + KP + ks)
    span = hi - lo
    has_span = span > tl.maximum(tl.abs(lo), tl.abs(hi)) * flat
    mask = (rows < HW)[:, None] & (ks < K)[None, :]
    z = tl.load(z_ptr + pid_b * HW * KP + rows[:, None] * KP + ks[None, :], mask=mask, other=0.0)
    out = tl.where(has_span[None, :], (z - lo[None, :]) / tl.where(has_span, span, 1.0)[None, :],
                   0.0)
    out_ptrs = out_ptr + pid_b * stride_ob + rows[:, None] * stride_oq + ks[None, :] * stride_ok
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the product: the candidates of KERNELS.md §2.6
# that meet the static budget (tests/ops/test_cuda_compile.py: ≤ 128 registers, no local
# memory, ≤ 3 SASS per element of T on the sm_86 and sm_90 cubins of Triton 3.6–3.9). Left out:
# (16, 256, 4, 4) (140 registers with the prologue, 6 SASS per element), (32, 128, 4, 4)
# (3.1–3.6 SASS per element), (32, 256, 8, 3) (3.5–4.7, and 8 B of stack on sm_90 with the
# prologue), (64, 64, 4, 4) (3.25 with the prologue on sm_90) and (64, 256, 8, 3) (8 B of
# stack on sm_86 with Triton 3.6). With the prologue (K ≤ 16) only (64, 128, 4, 4) fits
# sm_86's shared memory: the default, untimed.
GEMV_CONFIGS = ((64, 128, 4, 4), (32, 256, 4, 4))
# fp32 operands (3×TF32 products, for fp32's accuracy): 32 columns per step; 64 need 117–165
# registers.
GEMV_CONFIGS_FP32 = ((64, 32, 4, 3), (64, 32, 4, 4))
SM86_SHARED, SM90_SHARED = 101376, 232448  # shared memory per block (opt-in maximum)


def _gemv_shared(config, block_k: int, t_bytes: int, x_bytes: int, hopper: bool) -> int:
    """Shared memory of a product configuration as Triton 3.6–3.9 allocate it (checked against
    compiled sm_86/sm_90 cubins): ``stages - 1`` buffers of the T and X tiles; with a normalised
    (prologue) operand one fp16 X tile staged for the MMA; on sm_90 (warpgroup MMA reads its
    operands from shared memory) one more T tile and the staged X tile."""
    block_m, block_n, _, stages = config
    prologue = x_bytes == 4
    shared = (stages - 1) * block_n * (block_m * t_bytes + block_k * x_bytes)
    if prologue or hopper:
        shared += block_n * block_k * 2
    if hopper:
        shared += block_m * block_n * t_bytes
    return shared


def _fits(config, block_k: int, t_bytes: int, x_bytes: int, device: torch.device) -> bool:
    """Whether ``config`` fits the shared memory of ``device``'s GPU, or, for tensors that are
    not on a GPU (the interpreter, meta tensors), of every target: sm_86 (101,376 B per block)
    and sm_90 (232,448 B)."""
    if device.type == "cuda":
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
        limit = shared_memory_limit(device)
        return _gemv_shared(config, block_k, t_bytes, x_bytes, hopper) <= limit
    return (_gemv_shared(config, block_k, t_bytes, x_bytes, False) <= SM86_SHARED
            and _gemv_shared(config, block_k, t_bytes, x_bytes, True) <= SM90_SHARED)


def _gemv_default(batch: int, hw: int, dot_fp32: bool, fits) -> tuple[int, int, int, int]:
    """The untimed configuration (interpreter, graph capture before any timing, the compile
    checks): 64 rows × 128 columns of T per step with 4 warps (16 B loads, warpgroup MMA on
    sm_90, KP/64 of an X element normalised per T element; 32 columns for fp32 operands), 32
    rows when 64 would leave under 64 programs, and the most stages (4, 3, 2) that
    ``fits(config)``."""
    block_m = 64 if batch * triton.cdiv(hw, 64) >= 64 else 32
    for block_n in (32,) if dot_fp32 else (128, 64, 32):
        for stages in (3, 2) if dot_fp32 else (4, 3, 2):
            config = (block_m, block_n, 4, stages)
            if fits(config):
                return config
    return (block_m, 32, 4, 1)


def _gemv_block_k(kp: int, dot_fp32: bool) -> int:
    """Columns of Z per program: ≤ 32 (≤ 16 for fp32 operands). At KP = 64 two programs share
    each row block of T (adjacent in launch order, so the second read comes from L2), which
    halves the MMA work and registers per element of T and doubles the programs at batch 1."""
    return min(kp, 16 if dot_fp32 else 32)


def _gemv(t, w, x, x_stats, z, z_stats, kp: int, prologue: bool) -> None:
    """One iteration: ``z = w ⊙ (t · normalise(x))`` and its column stats into ``z_stats``."""
    batch, hw, _ = t.shape
    dot_fp32 = t.dtype == torch.float32
    block_k = _gemv_block_k(kp, dot_fp32)
    x_bytes = x.element_size()
    args = (t, w if w is not None else z, x, x_stats, z, z_stats, hw, reference.FLAT, *t.stride())

    def launch(config, args=args):
        block_m, block_n, warps, stages = config
        _refine_gemv_kernel[(kp // block_k, triton.cdiv(hw, block_m), batch)](
            *args, HAS_W=w is not None, PROLOGUE=prologue, DOT_FP32=dot_fp32,
            EVEN=hw % block_m == 0 and hw % block_n == 0, KP=kp,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def scratch_launch(config):  # timing writes only copies of the outputs
        launch(config, args[:4] + (torch.empty_like(z), z_stats.clone()) + args[6:])

    def fits(config):
        return _fits(config, block_k, t.element_size(), x_bytes, t.device)

    default = _gemv_default(batch, hw, dot_fp32, fits)
    key = ("refine", hw, kp, batch > 1, prologue, t.dtype)
    configs = [c for c in (GEMV_CONFIGS_FP32 if dot_fp32 else GEMV_CONFIGS) if fits(c)]
    launch(pick_config(key, configs, default, scratch_launch, autotune_enabled(t)))


def _block_r(kp: int) -> int:
    """Rows per program of the small row-wise kernels: about 4096 elements per program."""
    return max(1, min(64, 4096 // kp))


def _refine_chunk(s, c, out, iters: int, lam: float | None, t_max: float | None) -> None:
    """The whole refinement of one chunk of matrices ``s`` [B, HW, HW], ``c`` [B, HW, K] into
    ``out`` [B, HW, K]."""
    batch, hw, k = c.shape
    device = s.device
    kp = max(16, triton.next_power_of_2(k))
    dot_fp32 = s.dtype == torch.float32
    t, w = s, None
    if lam is not None or s.dtype == torch.bfloat16:
        t = torch.empty(batch, hw, hw, device=device, dtype=s.dtype if dot_fp32 else torch.float16)
    if lam is not None:
        w = torch.empty(batch, hw, device=device, dtype=torch.float32)
        transform(s, lam, t_max, t, w)
    elif t is not s:
        _to_fp16_kernel[(triton.cdiv(hw, 128), triton.cdiv(hw, 32), batch)](
            s, t, hw, *s.stride(), BLOCK_R=32, BLOCK_C=128, num_warps=4
        )

    # stats[i] holds the per-column (min, max) of iteration i's input; stats[0] is C₀'s.
    stats = torch.empty(iters + 1, batch, 2, kp, device=device, dtype=torch.float32)
    z = [torch.empty(batch, hw, kp, device=device, dtype=torch.float32) for _ in range(2)]
    block_k = min(kp, 32)
    _refine_init_kernel[(triton.cdiv(kp, block_k), batch)](
        c, z[0], stats, hw, k, batch, iters, *c.stride(), KP=kp, BLOCK_R=1024 // block_k,
        BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    prologue = kp <= 16
    if not prologue:
        x = torch.empty(batch, hw, kp, device=device, dtype=t.dtype if dot_fp32 else torch.float16)
    rows = (triton.cdiv(hw, _block_r(kp)), batch)
    for i in range(iters):
        src, dst = z[i % 2], z[(i + 1) % 2]
        if not prologue:
            _refine_normalise_kernel[rows](
                src, stats[i], x, hw, reference.FLAT, KP=kp, BLOCK_R=_block_r(kp), num_warps=4
            )
        _gemv(t, w, src if prologue else x, stats[i], dst, stats[i + 1], kp, prologue)
    _refine_finish_kernel[rows](
        z[iters % 2], stats[iters], out, hw, k, reference.FLAT, *out.stride(), KP=kp,
        BLOCK_R=_block_r(kp), num_warps=4,
    )  # fmt: skip


def _refine_triton(
    attn: torch.Tensor,
    cross: torch.Tensor,
    iters: int,
    lam: float | None,
    t_max: float | None = None,
) -> torch.Tensor:
    hw, k = attn.shape[-1], cross.shape[-1]
    s = attn.reshape(-1, hw, hw)
    c = cross.reshape(-1, hw, k)
    batch = s.shape[0]
    out = torch.empty(batch, hw, k, device=s.device, dtype=cross.dtype)
    t_bytes = hw * hw * (4 if s.dtype == torch.float32 else 2)
    writes_t = lam is not None or s.dtype == torch.bfloat16  # else T is attn as given
    chunk = max(1, CHUNK_BYTES // t_bytes) if writes_t else batch
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        _refine_chunk(s[part], c[part], out[part], iters, lam, t_max)
    return out.reshape(cross.shape)


@torch.library.custom_op("iseg_ops::refine_triton", mutates_args=())
def _refine_op(
    attn: torch.Tensor, cross: torch.Tensor, iters: int, lam: float | None, t_max: float | None
) -> torch.Tensor:
    """The Triton launcher as a custom op: ``torch.compile`` treats it as one opaque call (no
    graph break, no tracing of the launch code), and its launches can be replayed in a CUDA
    graph (no host synchronisation, no autotuning during capture)."""
    return _refine_triton(attn, cross, iters, lam, t_max)


@_refine_op.register_fake
def _(attn, cross, iters, lam, t_max):
    return torch.empty_like(cross, memory_format=torch.contiguous_format)


def refine(
    attn: torch.Tensor,
    cross: torch.Tensor,
    iters: int = 10,
    lam: float | None = 0.01,
    t_max: float | None = None,
) -> torch.Tensor:
    """Iterative refinement of initial maps by (entropy-reduced) self-attention (iSeg Eq. 4).

    Args:
        attn (Tensor): ``[..., HW, HW]`` self-attention whose rows sum to 1 (any strides).
        cross (Tensor): ``[..., HW, K]`` initial maps ``C₀`` (e.g. fused cross-attention).
        iters (int): refinement iterations N (default 10; 0 returns the min-max of ``cross``).
        lam (float | None): Ent-Self strength, applied to ``attn`` once per call (``P`` itself
            is never written, only its numerators). ``None`` uses ``attn`` as given (naive
            iteration, or a precomputed :func:`ent_self` output).
        t_max (float | None): upper clamp of Ent-Self's ``T`` (finite, > 0; see
            :func:`iseg_ops.ent_self`): ``T`` clamped to ``[0, t_max]``, 1 in the interactive
            recipe. Needs ``lam``; ``None`` (default) clamps only at 0.

    Returns:
        Tensor: ``[..., HW, K]`` in ``cross.dtype``, each column min-max normalised to [0, 1]
        (``minmax(Pᴺ C₀)``); a constant column gives zeros. fp32 accumulation throughout (the
        product's operands are fp16 for fp16/bf16 ``attn``, fp32 for fp32).

    Example:
        >>> attn = torch.softmax(torch.randn(144, 144), -1)
        >>> refine(attn, torch.rand(144, 3)).shape
        torch.Size([144, 3])
    """
    validate_refine(attn, cross, iters, lam)
    check_t_max("refine", t_max, lam)
    lam = None if lam is None else float(lam)
    t_max = None if t_max is None else float(t_max)
    if iters == 0:
        return reference.minmax(cross.float()).to(cross.dtype)
    if not use_triton("refine", attn, cross):
        return reference.refine(attn, cross, iters, lam, t_max)
    return _refine_op(attn, cross, iters, lam, t_max)
