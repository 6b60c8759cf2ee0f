"""CPU kernels for packed matrices: y = x Wᵀ with W = (q − z) · s held packed.

Measured on this machine (2-core AMD EPYC, AVX2, torch 2.13 CPU, onnxruntime 1.32; DESIGN.md's
table and experiments/results/kernels.json), the fastest way per format is:

- 2, 4 and 8-bit dense: ONNX Runtime's ``MatMulNBits`` (com.microsoft, MLAS kernels) at
  ``accuracy_level`` 4, i.e. int8 activations: several times faster than fp32 ``x @ W.T``.
  Only that configuration is fast: float zero points, accuracy level 0, or the weight fed as a
  graph input instead of a constant initializer (no prepacking) are all 10-70x slower, and
  8-bit refuses float zero points outright. So zero points go in as packed uint8, which holds
  only z in [0, 2^b − 1]; the rare group whose z lies outside (all its weights of one sign) is
  sent in clamped, z_c, and corrected exactly afterwards:
      y = x Wᵀ = Σ_k x_k (q_k − z_c) s − Σ_g (z − z_c)_g s_g Σ_{k∈g} x_k.
  ORT prepacks the weight into its own layout (float32 scales, block sums): ~1.3x our bytes
  plus ~50 KB per session, ~1.4x for SmolLM2 at 4 bits, group 64 (experiments/kernels.json);
  the kernel keeps nothing else. Layers that read one input (q/k/v, gate/up) share a session.
- ORT runs on the calling thread by default (``DEFAULT_ORT_THREADS``): with a 2-thread pool its
  workers spin beside torch's OpenMP threads, and SmolLM2 int4 decode was slower (1.7 against
  2.5 tokens/s, both with torch on 2 threads, on a busy machine).
- torch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` are slower than fp32
  here (DESIGN.md), so no backend uses them; experiments/kernels.py measures them again.
- 3, 5 and 6-bit dense, on the ``auto`` path: the same kernel on the codes *widened* to the
  next width it runs (3 -> 4, 5 and 6 -> 8 bits; ``widen_for_ort``). The weights it computes
  are exactly the plan's (same codes, scales, zeros); the price is memory: ORT holds 4 or 8
  bits per weight, not 3, 5 or 6 (so resident bytes exceed the plan's accounting there), for
  a decode ~20x faster than the torch path. The explicit ``ort`` backend does not widen.
- 2:4 and unstructured-sparse quantized weights, on the ``auto`` path: the same kernel on the
  matrix *densified* (``densify_for_ort``): a pruned weight gets its group's zero-point code,
  which dequantizes to exactly 0, and the codes are widened as above where needed. MLAS has no
  sparse kernel, and this CPU has no sparse tensor cores to skip zeros with: a decode step is
  bound by the bytes it reads, and the dense 4-bit container (4.5 bits per weight at group 64)
  is read ~25x faster than the torch path decodes the sparse stream. The price is memory again:
  q4+2:4 is 3.5 bits per weight in the plan, 4.5 as held (the profile's ``held_as``).
- everything else (float16 sparse, and every format on the ``torch`` backend):
  ``TorchUnpackKernel``, dequantizing a few rows at a time (a chunk that stays in cache) and
  multiplying in float32, so no dense copy of the weight is ever held.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AutocompressError
from .onnx_proto import FLOAT, Node, model_bytes, tensor_proto, value_info
from .packed import PackedMatrix
from .packing import pack_codes

ORT_BITS = (2, 4, 8)
ORT_BLOCKS = (16, 32, 64, 128, 256)
# weights dequantized at a time by the torch kernel: a 4 MiB float32 buffer at most. Larger
# chunks mean fewer (parallel) torch ops per call, which matters far more on a busy 2-core
# machine (each op can wait a scheduler tick for its second thread) than cache residency
CHUNK_ELEMENTS = 1 << 20
DEFAULT_ORT_THREADS = 1


class TorchUnpackKernel:
    """Any format: dequantize ``rows`` output rows at a time, multiply, write that slice of y."""

    name = "torch"

    def __init__(self, matrix: PackedMatrix):
        self.matrix = matrix
        # a multiple of 8 rows keeps every chunk's first code on a whole byte
        self.rows = max(8, CHUNK_ELEMENTS // max(1, matrix.in_features) // 8 * 8)

    def nbytes(self) -> int:
        return self.matrix.nbytes()

    def __call__(self, x: Tensor) -> Tensor:
        m = self.matrix
        y_t = torch.empty(m.out_features, x.shape[0], dtype=torch.float32)
        x_t = x.float().T
        for start in range(0, m.out_features, self.rows):
            stop = min(start + self.rows, m.out_features)
            torch.mm(m.dequantize_rows(start, stop), x_t, out=y_t[start:stop])
        return y_t.T


class Float16Kernel:
    """16-bit dense weights kept in float16. A few rows (decode) multiply in float16 directly,
    2.4x faster on this CPU than widening the weight to float32 on every call; the rows are
    scaled to a max of 1024 first so that large activations cannot overflow float16's range
    (relative error ~5e-4, float32 accumulation). More rows (prefill) widen the weight in
    chunks: CPU float16 GEMMs without native support are ~100x slower than float32 ones."""

    name = "torch"
    MAX_F16_ROWS = 8

    def __init__(self, matrix: PackedMatrix):
        if matrix.bits != 16 or matrix.layout != "dense":
            raise AutocompressError("Float16Kernel runs dense 16-bit matrices only")
        self.matrix = matrix
        n = matrix.out_features * matrix.in_features
        self.weight = matrix.data[:2 * n].view(torch.float16).reshape(matrix.out_features,
                                                                      matrix.in_features)
        self.wide = TorchUnpackKernel(matrix)

    def nbytes(self) -> int:
        return self.matrix.nbytes()

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.MAX_F16_ROWS and not x.is_cuda:
            return self.wide(x)
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 1024
        return torch.nn.functional.linear((x / scale).half(), self.weight).float() * scale


def ort_unsupported_reason(matrix: PackedMatrix) -> str | None:
    """Why ONNX Runtime's MatMulNBits cannot run ``matrix``, or None when it can."""
    if matrix.bits not in ORT_BITS:
        return f"{matrix.bits}-bit weights (MatMulNBits runs 2, 4 and 8 bits)"
    if matrix.layout != "dense":
        return f"{matrix.layout} sparse weights (MatMulNBits runs dense weights)"
    return None


# the width MatMulNBits runs each width's codes at: itself, or the next one up
WIDEN_TO = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 8: 8}


@dataclass
class OrtWeight:
    """What MatMulNBits runs for a packed matrix: ``matrix``, dense at 2, 4 or 8 bits, and,
    when it was densified from sparse storage, the ``keep`` mask [out, in] of the weights that
    are not pruned (the zero-point correction must skip the pruned ones, see cpu_kernels'
    module docstring). ``kind``: ``ort`` (the matrix as stored), ``ort-widened`` (codes moved
    to a wider container) or ``ort-densified`` (sparse storage made dense)."""

    matrix: PackedMatrix
    keep: Tensor | None = None
    kind: str = "ort"


def widen_for_ort(matrix: PackedMatrix) -> PackedMatrix | None:
    """The matrix with its codes in a container MatMulNBits runs (3 -> 4, 5/6 -> 8 bits) and
    explicit zero points (a symmetric grid's fixed zero 2^(b-1) is not the wider grid's), or
    None when it is not a dense 3/5/6-bit matrix. Dequantizes to exactly the same weight."""
    if matrix.layout != "dense" or matrix.bits == 16 or WIDEN_TO[matrix.bits] == matrix.bits:
        return None
    return _repacked(matrix, matrix.dense_codes())


def densify_for_ort(matrix: PackedMatrix) -> OrtWeight | None:
    """A 2:4 or bitmap-sparse quantized matrix as dense codes at the width MatMulNBits runs:
    every pruned weight takes its group's zero point as its code, so it dequantizes to 0 —
    exactly where that zero point is a code of the grid (round(z) in [0, 2^b − 1]); a group
    whose zero point lies outside (its kept weights all of one sign) takes the clamped z_c and
    is corrected after the product over its kept weights only (``keep``). None when the matrix
    is dense or 16-bit."""
    if matrix.layout == "dense" or matrix.bits == 16:
        return None
    codes, keep = matrix.codes_and_mask()
    group_of_column = torch.arange(matrix.in_features) // matrix.group_width
    zero_codes = matrix.zero_points().round().clamp(0, 2**WIDEN_TO[matrix.bits] - 1)
    codes = torch.where(keep, codes, zero_codes.to(torch.uint8)[:, group_of_column])
    return OrtWeight(_repacked(matrix, codes), keep, "ort-densified")


def _repacked(matrix: PackedMatrix, codes: Tensor) -> PackedMatrix:
    """A dense matrix of ``codes`` [out, in] on ``matrix``'s grid, in the container MatMulNBits
    runs for its width, with explicit zero points (a symmetric grid's fixed 2^(b-1) is not the
    wider container's)."""
    target = WIDEN_TO[matrix.bits]
    return dataclasses.replace(matrix, bits=target, sym=False, layout="dense",
                               data=pack_codes(codes, target), n_kept=codes.numel(),
                               zero=matrix.zero_points().to(torch.float16))


def ort_ready(matrix: PackedMatrix, widen: bool) -> OrtWeight | None:
    """What MatMulNBits would run for ``matrix``: itself, its widened or densified copy (only
    when ``widen``), or None when it cannot run it at all."""
    if ort_unsupported_reason(matrix) is None:
        return OrtWeight(matrix)
    if not widen:
        return None
    if matrix.layout != "dense":
        return densify_for_ort(matrix)
    wide = widen_for_ort(matrix)
    return None if wide is None else OrtWeight(wide, kind="ort-widened")


def warm_up_ort(threads: int | None = None) -> None:
    """Make ONNX Runtime's one-off state (its environment, a few MB here) with a throwaway
    session, so that measurements of what layers hold do not count it. ``threads``: those the
    layers will ask for (the first session decides whether the process has a thread pool)."""
    if ort_available():
        from ..compress.weights import compress_weight
        from ..plan import LayerConfig
        from .packed import PackedLinear

        cfg = LayerConfig(bits=4, group_size=32)
        weight = compress_weight(torch.randn(16, 64), cfg)
        OrtMatMulNBitsKernel(PackedLinear.from_compressed(weight, cfg).matrices[0],
                             threads=threads)


def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OrtMatMulNBitsGroup:
    """One ONNX Runtime session for the matrices that read the same input (q/k/v, gate/up): a
    MatMulNBits node each, weights, scales and zero points as constant initializers (so MLAS
    prepacks them). One run serves all members: fewer sessions (~50 KB each) and fewer calls
    (~20 us each) per token."""

    def __init__(self, matrices: list[PackedMatrix | OrtWeight], accuracy_level: int = 4,
                 threads: int | None = None):
        weights = [m if isinstance(m, OrtWeight) else OrtWeight(m) for m in matrices]
        matrices = [w.matrix for w in weights]
        for matrix in matrices:
            reason = ort_unsupported_reason(matrix)
            if reason:
                raise AutocompressError(f"the ort backend has no kernel for {reason}")
        if len({m.in_features for m in matrices}) != 1:
            raise ValueError("matrices of one ORT group must share their input size")
        self.in_features = matrices[0].in_features
        self.out_features = [m.out_features for m in matrices]
        self.accuracy_level = accuracy_level
        self.session = _ort_session(self._model(matrices), threads)
        self.kinds = [w.kind for w in weights]
        self.corrections = [_zero_correction(w.matrix, w.keep) for w in weights]
        self._source = None  # weak reference to the input whose outputs are pending
        self._key: tuple = ()
        self._pending: dict[int, Tensor] = {}

    def run(self, x: Tensor) -> list[Tensor]:
        """Every member's y = x Wᵀ, x float32 [M, K]."""
        x = x.float().contiguous()
        outputs = [torch.from_numpy(y) for y in self.session.run(None, {"A": x.numpy()})]
        for y, correction in zip(outputs, self.corrections):
            if correction is not None:
                rows, groups, offsets, width, keep = correction
                y.index_add_(1, rows, -(_group_sums(x, width, groups, keep) * offsets))
        return outputs

    def output(self, index: int, x: Tensor) -> Tensor:
        """Member ``index``'s output; the others' are kept until they ask for the same input
        (the same tensor, or a view of it, unchanged since: version counter and pointer)."""
        owner = x if x._base is None else x._base
        key = (x.data_ptr(), tuple(x.shape), owner._version)
        if (index in self._pending and self._source is not None and self._source() is owner
                and key == self._key):
            return self._pending.pop(index)
        outputs = self.run(x)
        self._source, self._key = weakref.ref(owner), key
        self._pending = {i: y for i, y in enumerate(outputs) if i != index}
        return outputs[index]

    def _model(self, matrices: list[PackedMatrix]) -> bytes:
        nodes, initializers, outputs = [], [], []
        for i, matrix in enumerate(matrices):
            node, tensors = _matmul_nbits_node(matrix, f"_{i}", self.accuracy_level)
            nodes.append(node)
            initializers += tensors
            outputs.append(value_info(node.outputs[0], FLOAT, ["M", matrix.out_features]))
        return model_bytes(nodes, [value_info("A", FLOAT, ["M", self.in_features])], outputs,
                           initializers)


class OrtMatMulNBitsKernel:
    """y = x Wᵀ by ONNX Runtime's MatMulNBits: member ``index`` of a group (its own by default)."""

    name = "ort"

    def __init__(self, matrix: PackedMatrix | OrtWeight | None = None, accuracy_level: int = 4,
                 threads: int | None = None, group: OrtMatMulNBitsGroup | None = None,
                 index: int = 0):
        self.group = group or OrtMatMulNBitsGroup([matrix], accuracy_level, threads)
        self.index = index
        self.name = self.group.kinds[index]
        self._correction = self.group.corrections[index]

    def nbytes(self) -> int:
        """What this kernel holds besides ORT's prepacked copy (which ORT owns)."""
        if self._correction is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._correction
                   if isinstance(t, Tensor))

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.group.out_features) == 1:
            return self.group.run(x)[0]
        return self.group.output(self.index, x)


def _matmul_nbits_node(matrix: PackedMatrix, suffix: str, accuracy_level: int):
    """The MatMulNBits node of ``matrix`` (input "A", output "Y{suffix}") and its initializers:
    codes re-laid as MatMulNBits wants them, [N, n_blocks, block·bits/8] (each row padded to
    whole blocks), float32 scales [N, n_blocks], packed uint8 zero points when asymmetric."""
    n, k, bits = matrix.out_features, matrix.in_features, matrix.bits
    block = _ort_block(matrix)
    n_blocks = math.ceil(k / block)
    codes = torch.zeros(n, n_blocks * block, dtype=torch.uint8)
    codes[:, :k] = matrix.dense_codes()
    weight = pack_codes(codes, bits).reshape(n, n_blocks, block * bits // 8)
    scale = _per_block(matrix.scale.float(), matrix, block)
    names = [f"B{suffix}", f"scales{suffix}"]
    initializers = [tensor_proto(names[0], weight.numpy()), tensor_proto(names[1], scale.numpy())]
    if not matrix.sym:  # symmetric grids use MatMulNBits' default zero point, 2^(b−1)
        zero = _per_block(_clamped_zero(matrix), matrix, block).to(torch.uint8)
        per_byte = 8 // bits
        padded = torch.zeros(n, math.ceil(n_blocks / per_byte) * per_byte, dtype=torch.uint8)
        padded[:, :n_blocks] = zero
        names.append(f"zero_points{suffix}")
        initializers.append(tensor_proto(names[-1], pack_codes(padded, bits).reshape(n, -1).numpy()))
    node = Node("MatMulNBits", ["A", *names], [f"Y{suffix}"], domain="com.microsoft",
                attributes=dict(K=k, N=n, bits=bits, block_size=block,
                                accuracy_level=accuracy_level))
    return node, initializers


def _ort_block(matrix: PackedMatrix) -> int:
    """MatMulNBits' block: the group size, or for one group per row the largest power of two
    up to 128 that fits the row (the row's scale is repeated over its blocks)."""
    if matrix.group_size != -1:
        if matrix.group_size not in ORT_BLOCKS:
            raise AutocompressError(
                f"the ort backend has no kernel for group size {matrix.group_size}")
        return matrix.group_size
    return max(b for b in ORT_BLOCKS[:4] if b <= max(16, matrix.in_features))


def _per_block(params: Tensor, matrix: PackedMatrix, block: int) -> Tensor:
    """Per-group values [out, n_groups] -> per-MatMulNBits-block values [out, n_blocks]."""
    n_blocks = math.ceil(matrix.in_features / block)
    if matrix.group_size == -1:
        return params[:, :1].expand(-1, n_blocks).contiguous()
    return params.contiguous()


def _clamped_zero(matrix: PackedMatrix) -> Tensor:
    return matrix.zero_points().round().clamp(0, 2**matrix.bits - 1)


def _zero_correction(matrix: PackedMatrix, keep: Tensor | None = None):
    """(rows, groups, (z − z_c)·s, group width, keep) of the groups whose zero point was
    clamped for ORT, or None when there are none (the usual case). ``keep`` is None for a
    dense matrix, else the [n, width] mask of the kept weights of each such (row, group)."""
    if matrix.sym:
        return None
    zero = matrix.zero_points()
    delta = zero - _clamped_zero(matrix)
    rows, groups = torch.nonzero(delta, as_tuple=True)
    if rows.numel() == 0:
        return None
    offsets = delta[rows, groups] * matrix.scale.float()[rows, groups]
    width = matrix.group_width
    if keep is not None:
        keep = _grouped(keep.float(), width)[rows, groups]
    return rows, groups, offsets, width, keep


def _grouped(x: Tensor, width: int) -> Tensor:
    """[M, K] -> [M, n_groups, width], the last group padded with zeros."""
    n_groups = math.ceil(x.shape[1] / width)
    padded = torch.nn.functional.pad(x, (0, n_groups * width - x.shape[1]))
    return padded.reshape(x.shape[0], n_groups, width)


def _group_sums(x: Tensor, width: int, groups: Tensor, keep: Tensor | None) -> Tensor:
    """Σ_{k∈g} x_k [M, n] for the listed groups (over the kept weights of each when ``keep``)."""
    grouped = _grouped(x, width)
    if keep is None:
        return grouped.sum(dim=2)[:, groups]
    return torch.einsum("mnw,nw->mn", grouped[:, groups], keep)


_POOL: dict[str, int] = {}  # {"global": threads} once ORT's global pool is made, else {"none": 0}


def _ort_session(model: bytes, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # a per-session arena is memory the weight doesn't need
    options.enable_mem_pattern = False
    threads = threads or DEFAULT_ORT_THREADS
    if _use_global_pool(threads):
        # one pool for all sessions: a pool per session costs ~60 ms and threads of its own
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads  # 1: the calling thread, no pool at all
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    # the Python wrapper keeps the serialized model (weights included) to re-create the session
    # if providers change; we never do, and it would double the memory the weights take
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


def _use_global_pool(threads: int) -> bool:
    """ORT's global thread pool is sized once per process, before its first session; once it
    exists every session must use it (ORT refuses per-session pools beside it). A first
    request for 1 thread makes no pool: sessions then run on the calling thread."""
    if not _POOL:
        if threads == 1:
            _POOL["none"] = 0
        else:
            from onnxruntime.capi import _pybind_state

            try:
                _pybind_state.set_global_thread_pool_sizes(threads, 1)
                _POOL["global"] = threads
            except Exception as exc:  # an ORT environment made elsewhere already exists
                warnings.warn(f"ONNX Runtime global thread pool not set ({exc}); "
                              "using per-session pools")
                _POOL["none"] = 0
    if "global" in _POOL:
        if threads != _POOL["global"]:
            warnings.warn(f"ONNX Runtime's thread pool has {_POOL['global']} threads for this "
                          f"process; {threads} asked for")
        return True
    return False
