"""Device-side ``vireid::kreciprocal_jaccard``: the k-reciprocal Jaccard distance in vectorised torch ops.

What runs where: CUDA tensors are routed here by the registry (``vireid_fast.ops._registry``), and
``VIREID_BACKEND=triton`` sends CPU tensors here too (that is how it is tested on this GPU-less machine). Every step
runs on the inputs' device; nothing is copied to the host, and there is no Python loop over rows, only over a few
work blocks.

Why torch ops and not a hand-written Triton kernel: after the kNN, the work is a data-dependent sparse graph
computation (reciprocal-neighbour tests, set unions of variable size, a sparse-sparse min-sum through an inverted
index). Its natural building blocks, sort / searchsorted / unique / repeat_interleave / index_add_, are already tuned
device primitives, whereas a Triton kernel would need per-row variable-length buffers and its own sorts. The
arithmetic (a few flops per sparse entry) is small next to the kNN GEMM before it.

Semantics are those of the C++ kernel (csrc/jaccard.cpp) and of ``kreciprocal_jaccard_ref`` (spec:
shared/spec/jaccard.md): reciprocal sets for k1 and round_half_even(k1 / 2), the 2/3 expansion, the softmax encoding
in float64 (``rank_sim`` for pairs in the kNN table, a float64 dot of the float32 rows otherwise), query expansion
over R[i][:k2] (PCLHD's per-modality means when ``modality`` is given), s_ij = sum_c min(V_ic, V_jc) in float64 and
distance 1 - s / (2 - s) clamped at 0, rounded to float32. The sparse structure is exact: a pair is stored iff its
rows of V share a column (every V entry is >= e^-4 / (k2 * |row|) > 0, which keeps such a pair's float32 distance
below 1 for all k1, k2 in use).

How: every sparse set is a sorted tensor of (row, column) keys ``row * N + column`` (int32 when N^2 < 2^31, which
CPU torch sorts with a radix sort; int64 beyond). Membership tests are ``searchsorted`` lookups (for the expansion's
|H_c & A_i| counts, a chunk x N mask set and cleared per row chunk), variable-length rows are expanded with
``repeat_interleave``, and per-(row, column) sums are a stable sort + ``unique_consecutive`` + ``index_add_``.
The min-sum expands each entry (i, c) of V over the rows j >= i of column c's inverted-index list into
(i, j, min(V_ic, V_jc)) triples and sums them by (i, j), per row chunk, either by sorted keys or, when the chunk's
triples are dense enough, with ``index_add_`` into a chunk x N accumulator. Each pair is computed once, over row i's
columns in ascending order as in the C++ kernel, and mirrored, so the result is exactly symmetric.

Memory: O(N * L) for the sparse rows (L = the longest row of V after query expansion, <= k2 * k1 * (k1 / 2 + 1)) and
the output, plus work blocks of about ``_BLOCK`` expanded elements (triples, pair x d products for the dot products)
in row chunks, the expansion step's chunk x N membership mask (``_MARK_BLOCK`` bytes) and the min-sum accumulator of
at most ``_DENSE_RATIO`` x the chunk's triples; never N x N. (A single row whose expansion exceeds ``_BLOCK`` forms a
block of its own.)
"""

from __future__ import annotations

import torch

_BLOCK = 1 << 22  # elements per work block (expanded triples, pair x feature products)
_MARK_BLOCK = 1 << 24  # bytes of the chunk x N membership mask of the expansion step
_INT32_KEYS = 2**31 - 1  # (row, column) keys below this are sorted as int32 (a radix sort on CPU: much faster)
# A min-sum row chunk sums its (i, j) contributions in a dense chunk x N float64 accumulator when chunk x N is at most
# _DENSE_RATIO x its number of contributions (then clearing and scanning the accumulator costs less than sorting),
# otherwise by sorting the (i, j) keys.
_DENSE_RATIO = 4


def _take(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source[index] along dim 0 for an index of any shape, through index_select (far faster than advanced indexing
    for long random index vectors on CPU)."""
    return source.index_select(0, index.flatten()).view(*index.shape, *source.shape[1:])


def _key_dtype(key_range: int) -> torch.dtype:
    return torch.int32 if key_range <= _INT32_KEYS else torch.int64


def _pair_keys(rows: torch.Tensor, cols: torch.Tensor, n: int, key_range: int) -> torch.Tensor:
    """rows * n + cols in the narrowest integer type holding ``key_range`` (decode with ``// n`` and ``% n``)."""
    dtype = _key_dtype(key_range)
    return rows.to(dtype) * n + cols.to(dtype)


def _expand_segments(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments [starts[s], starts[s] + counts[s]): (owner segment, position) of every element, in order."""
    owner = torch.repeat_interleave(counts)
    shift = starts - (torch.cumsum(counts, 0) - counts)  # position = element number + its segment's shift
    return owner, _take(shift, owner).add_(torch.arange(owner.numel(), device=counts.device))


def _lookup_sorted(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, position) of each query in a sorted 1-D key tensor (position is clamped when not found)."""
    if sorted_keys.numel() == 0:
        zeros = torch.zeros_like(queries)
        return zeros.bool(), zeros
    pos = torch.searchsorted(sorted_keys, queries).clamp_max(sorted_keys.numel() - 1)
    return _take(sorted_keys, pos) == queries, pos


def _sum_by_key(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and the sum of ``values`` per key, added in input order within each key."""
    sorted_keys, order = torch.sort(keys, stable=True)  # stable: each key's values keep their input order
    unique, inverse = torch.unique_consecutive(sorted_keys, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device)
    return unique, sums.index_add_(0, inverse, _take(values, order))


def _row_chunks(row_cost: torch.Tensor, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed cost stays within ``budget`` (at least one row each), <= max_rows rows."""
    n = row_cost.numel()
    ends = torch.cumsum(row_cost, 0)
    chunks, begin = [], 0
    while begin < n:
        before = int(ends[begin - 1]) if begin else 0
        end = int(torch.searchsorted(ends, before + budget, right=True))
        end = min(max(end, begin + 1), begin + max_rows, n)
        chunks.append((begin, end))
        begin = end
    return chunks


def _csr_rows(row: torch.Tensor, n: int) -> torch.Tensor:
    crow = torch.zeros(n + 1, dtype=torch.int64, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=n), 0)
    return crow


def _reciprocal_position(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """back[i, t] = the first position of i in R[rank[i, t]] (k1 if absent), and the sorted (i, R[i][t]) edge keys.

    Returns back (N, k1) int64, edge_keys (N * k1,) sorted keys i * N + j (int32 or int64, see ``_pair_keys``),
    edge_index (N * k1,) int64: the flat position i * k1 + t of each sorted key (the first one for repeated j).
    """
    n, k1 = rank.shape
    rows = torch.arange(n, device=rank.device)[:, None]
    edge_keys, edge_index = torch.sort(_pair_keys(rows, rank, n, n * n).flatten(), stable=True)
    found, pos = _lookup_sorted(edge_keys, _pair_keys(rank, rows, n, n * n).flatten())
    back = torch.where(found, _take(edge_index, pos) % k1, k1).view(n, k1)
    return back, edge_keys, edge_index


def _expansion_sets(rank: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """Steps 2-3: sorted unique keys i * N + j of the expanded sets E_i."""
    n, k1 = rank.shape
    kh = round(k1 / 2)  # Python's round is round-half-even, like np.around
    h_width = min(kh + 1, k1)
    # recip(i, k) = {R[i][t] : t < width(k), i in R[R[i][t]][:width(k)]}, width(k1) = k1. Absent slots hold N.
    a_table = torch.where(back < k1, rank, n)
    h_table = rank[:, :h_width]
    h_mask = back[:, :h_width] < h_width
    h_size = h_mask.sum(1)
    a_rows, a_pos = torch.nonzero(a_table < n, as_tuple=True)
    pieces = [_pair_keys(a_rows, a_table[a_rows, a_pos], n, n * n)]
    # Membership in A_i through a (rows x (N + 1)) mark table: set for a chunk's A rows, read, then cleared again.
    step = max(1, min(_BLOCK // (k1 * h_width), _MARK_BLOCK // (n + 1)))
    marks = torch.zeros(min(step, n) * (n + 1), dtype=torch.bool, device=rank.device)
    for begin in range(0, n, step):
        cands = a_table[begin:begin + step]                         # A_i, (rows, k1)
        rows = torch.arange(cands.shape[0], device=rank.device)[:, None]
        marked = rows * (n + 1) + cands
        marks[marked] = True
        present = cands < n
        cands = cands.clamp_max(n - 1)
        members = _take(h_table, cands)                             # H_c for c in A_i, (rows, k1, h_width)
        valid = _take(h_mask, cands) & present[:, :, None]
        in_a = _take(marks, rows[:, :, None] * (n + 1) + members)
        marks[marked] = False
        common = (in_a & valid).sum(2)
        # Same float64 test as the community code: |H_c & A_i| > 2/3 * |H_c|.
        grow = present & (common.double() > (2.0 / 3.0) * _take(h_size, cands).double())
        add = grow[:, :, None] & valid & ~in_a  # members of A_i are in already
        pieces.append(_pair_keys((rows[:, :, None] + begin).expand_as(members)[add], members[add], n, n * n))
    return torch.unique_consecutive(torch.sort(torch.cat(pieces), stable=True).values)


def _encode(features: torch.Tensor, rank_sim: torch.Tensor | None, e_keys: torch.Tensor, edge_keys: torch.Tensor,
            edge_index: torch.Tensor) -> torch.Tensor:
    """Step 4: float64 softmax over each E_i of -(2 - 2 f_i . f_j); values in the order of ``e_keys``."""
    n, d = features.shape
    rows, cols = (e_keys // n).long(), (e_keys % n).long()
    sims = torch.empty(e_keys.numel(), dtype=torch.float64, device=features.device)
    if rank_sim is not None:
        known, pos = _lookup_sorted(edge_keys, e_keys)
        sims[known] = rank_sim.flatten()[edge_index[pos[known]]].double()
        missing = torch.nonzero(~known).flatten()
    else:
        missing = torch.arange(e_keys.numel(), device=features.device)
    step = max(1, _BLOCK // max(d, 1))
    for begin in range(0, missing.numel(), step):
        at = missing[begin:begin + step]
        # float32 x float32 products are exact in float64; only the summation order differs from the C++ kernel.
        sims[at] = (_take(features, _take(rows, at)).double() * _take(features, _take(cols, at)).double()).sum(1)
    logits = -(2.0 - 2.0 * sims)
    row_max = torch.full((n,), -torch.inf, dtype=torch.float64, device=features.device)
    row_max.scatter_reduce_(0, rows, logits, reduce="amax")
    weights = torch.exp(logits - _take(row_max, rows))
    totals = torch.zeros(n, dtype=torch.float64, device=features.device).index_add_(0, rows, weights)
    return weights / _take(totals, rows)


def _query_expansion(rank: torch.Tensor, k2: int, modality: torch.Tensor | None, v_crow: torch.Tensor,
                     v_col: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 5: V'[i] = sum_t w[i, t] V[R[i][t]] over t < k2; returns V' as (crow, col, val) with sorted columns."""
    n = rank.shape[0]
    neighbours = rank[:, :k2]
    if modality is None:
        weights = torch.full((n, k2), 1.0 / k2, dtype=torch.float64, device=rank.device)
    else:
        # Mean within each modality present among R[i][:k2], then the mean over the present modalities.
        is_one = _take(modality, neighbours) != 0
        ones = is_one.sum(1, keepdim=True)
        groups = (ones > 0).long() + (ones < k2).long()
        per_group = torch.where(is_one, ones, k2 - ones)
        weights = 1.0 / (groups.double() * per_group.double())
    v_len = v_crow.diff()
    row_cost = _take(v_len, neighbours).sum(1)
    rows_out, cols_out, vals_out = [], [], []
    for begin, end in _row_chunks(row_cost, _BLOCK, max(1, _INT32_KEYS // n)):
        sources = neighbours[begin:end].flatten()
        owner, where = _expand_segments(_take(v_crow, sources), _take(v_len, sources))
        local_keys = _pair_keys(owner // k2, _take(v_col, where), n, (end - begin) * n)
        keys, sums = _sum_by_key(local_keys, _take(weights[begin:end].flatten(), owner) * _take(v_val, where))
        rows_out.append((keys // n).long() + begin)
        cols_out.append((keys % n).long())
        vals_out.append(sums)
    rows = torch.cat(rows_out)
    return _csr_rows(rows, n), torch.cat(cols_out), torch.cat(vals_out)


def _min_sum_distances(q_crow: torch.Tensor, q_col: torch.Tensor,
                       q_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 6 on the upper triangle: (i, j >= i, float32 distance) for every pair of rows sharing a column."""
    n = q_crow.numel() - 1
    device = q_col.device
    q_row = torch.repeat_interleave(torch.arange(n, device=device), q_crow.diff())
    # Inverted index: column c's rows ascending; an entry's own slot there is where its j >= i part starts.
    inv_order = torch.sort(_pair_keys(q_col, q_row, n, n * n), stable=True).indices
    inv_row, inv_val = _take(q_row, inv_order).to(_key_dtype(n * n)), _take(q_val, inv_order)
    inv_end = _csr_rows(q_col, n)[1:]
    own_slot = torch.empty_like(inv_order)
    own_slot[inv_order] = torch.arange(inv_order.numel(), device=device)
    reach = _take(inv_end, q_col) - own_slot  # rows j >= i holding column c
    row_cost = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, q_row, reach)
    out_i, out_j, out_d = [], [], []
    for begin, end in _row_chunks(row_cost, _BLOCK, max(1, _INT32_KEYS // n)):
        lo, hi = int(q_crow[begin]), int(q_crow[end])
        owner, where = _expand_segments(own_slot[lo:hi], reach[lo:hi])
        mins = torch.minimum(_take(q_val[lo:hi], owner), _take(inv_val, where))
        span = (end - begin) * n
        row_keys = _pair_keys(q_row[lo:hi] - begin, torch.zeros((), dtype=torch.int64, device=device), n, span)
        local_keys = _take(row_keys, owner).add_(_take(inv_row, where))
        del owner, where
        # Each (i, j) receives its contributions in ascending column order, as in the C++ kernel; all are > 0.
        if span <= _DENSE_RATIO * local_keys.numel():
            acc = torch.zeros(span, dtype=torch.float64, device=device).index_add_(0, local_keys, mins)
            keys = torch.nonzero(acc).flatten()
            sums = _take(acc, keys)
        else:
            keys, sums = _sum_by_key(local_keys, mins)
        del local_keys, mins
        dist = (1.0 - sums / (2.0 - sums)).clamp_min(0.0).float()
        keep = dist < 1.0
        keys = keys[keep]
        out_i.append((keys // n).long() + begin)
        out_j.append((keys % n).long())
        out_d.append(dist[keep])
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_d)


def launch(features: torch.Tensor, initial_rank: torch.Tensor, rank_sim: torch.Tensor | None, k2: int,
           modality: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-reciprocal Jaccard distance in CSR form, computed on the inputs' device.

    Args:
        features: (N, d) float32, L2-normalised.
        initial_rank: (N, k1) int64, the k1 nearest rows of each row, nearest first.
        rank_sim: None or (N, k1) float32, ``f_i . f_R[i][t]`` (reused instead of recomputing those products).
        k2: query-expansion size, 1 <= k2 <= k1 (1 = none).
        modality: None or (N,) int64 of 0/1: PCLHD's modality-invariant query expansion.
    Returns:
        crow (N+1,) int64, col (nnz,) int64 sorted within each row, values (nnz,) float32: every entry < 1 of the
        (N, N) distance; all other entries are 1.0.
    """
    if features.dim() != 2 or features.dtype != torch.float32:
        raise ValueError("kreciprocal_jaccard: features must be (N, d) float32")
    if initial_rank.dim() != 2 or initial_rank.dtype != torch.int64 or initial_rank.shape[0] != features.shape[0]:
        raise ValueError("kreciprocal_jaccard: initial_rank must be (N, k1) int64 with one row per feature")
    n, k1 = initial_rank.shape
    if not (n > 0 and 1 <= k1 <= n and 1 <= k2 <= k1):
        raise ValueError(f"kreciprocal_jaccard: need N > 0, 1 <= k1 <= N and 1 <= k2 <= k1 (N={n}, k1={k1}, k2={k2})")
    if int(initial_rank.min()) < 0 or int(initial_rank.max()) >= n:
        raise ValueError("kreciprocal_jaccard: initial_rank entries must be in [0, N)")
    if rank_sim is not None and (rank_sim.shape != initial_rank.shape or rank_sim.dtype != torch.float32):
        raise ValueError("kreciprocal_jaccard: rank_sim must be (N, k1) float32 like initial_rank")
    if modality is not None and (modality.shape != (n,) or modality.dtype != torch.int64):
        raise ValueError("kreciprocal_jaccard: modality must be (N,) int64")
    features = features.contiguous()
    rank = initial_rank.contiguous()

    back, edge_keys, edge_index = _reciprocal_position(rank)
    e_keys = _expansion_sets(rank, back)
    del back
    v_val = _encode(features, rank_sim, e_keys, edge_keys, edge_index)
    v_crow, v_col = _csr_rows((e_keys // n).long(), n), (e_keys % n).long()
    del e_keys, edge_keys, edge_index
    if k2 != 1:
        v_crow, v_col, v_val = _query_expansion(rank, k2, modality, v_crow, v_col, v_val)
    up_i, up_j, up_d = _min_sum_distances(v_crow, v_col, v_val)
    del v_crow, v_col, v_val

    # Full rows: the upper triangle and its mirror (diagonal once), ordered by (row, column).
    off_diagonal = up_i != up_j
    rows = torch.cat([up_i, up_j[off_diagonal]])
    cols = torch.cat([up_j, up_i[off_diagonal]])
    values = torch.cat([up_d, up_d[off_diagonal]])
    order = torch.sort(_pair_keys(rows, cols, n, n * n), stable=True).indices
    return _csr_rows(rows, n), _take(cols, order), _take(values, order)
