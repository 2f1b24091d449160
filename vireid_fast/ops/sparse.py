"""A sparse distance that cannot be misread: CSR storage plus the value of the entries it does not store.

``kreciprocal_jaccard(..., sparse=True)`` stores only the Jaccard distances below 1; every entry not stored is 1.0
("far"). A ``torch.sparse_csr_tensor`` cannot carry that: its ``.to_dense()`` fills 0.0, which for a distance means
"identical", and DBSCAN on it puts most points into one cluster. :class:`SparseDistance` keeps the fill with the
storage, so every way to densify it gives exactly the dense distance, and :func:`vireid_fast.ops.dbscan` reads the fill
from it instead of guessing.
"""

from __future__ import annotations

import torch

__all__ = ["SparseDistance", "csr_to_dense"]


def csr_to_dense(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int,
                 fill: float = 1.0) -> torch.Tensor:
    """(N, N) matrix in ``values``' dtype, ``fill`` except at the CSR entries: crow (N+1,), col and values (nnz,)."""
    dense = torch.full((n, n), fill, dtype=values.dtype, device=values.device)
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())
    dense[rows, col] = values
    return dense


class SparseDistance:
    """An (N, N) distance in CSR form whose entries not stored equal ``fill``.

    Attributes:
        crow: (N + 1,) int64 row pointers; col: (nnz,) int64 column indices, sorted within each row;
        vals: (nnz,) float32 stored distances; fill: the value of every entry not stored (1.0 for the Jaccard distance).

    The accessors mirror a torch CSR tensor (``crow_indices()``, ``col_indices()``, ``values()``, ``shape``,
    ``device``, ``dtype``) so code reading the storage keeps working; densifying — ``to_dense()``, ``numpy()``,
    ``csr_to_dense(crow, col, values, n, fill)`` — always fills ``fill``. :meth:`to_sparse_csr` hands out the plain
    torch CSR tensor only together with its fill, as a reminder that its own ``to_dense()`` would fill 0.
    """

    __slots__ = ("crow", "col", "vals", "fill", "_n")

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int, fill: float) -> None:
        self.crow, self.col, self.vals, self._n, self.fill = crow, col, values, int(n), float(fill)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._n, self._n))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def device(self) -> torch.device:
        return self.vals.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vals.dtype

    def dim(self) -> int:
        return 2

    def crow_indices(self) -> torch.Tensor:
        return self.crow

    def col_indices(self) -> torch.Tensor:
        return self.col

    def values(self) -> torch.Tensor:
        return self.vals

    def nnz(self) -> int:
        return int(self.col.numel())

    def to_dense(self) -> torch.Tensor:
        """The dense (N, N) distance: the stored entries, ``fill`` everywhere else (O(N^2) memory)."""
        return csr_to_dense(self.crow, self.col, self.vals, self._n, self.fill)

    def numpy(self):
        return self.to_dense().cpu().numpy()

    def to_sparse_csr(self) -> tuple[torch.Tensor, float]:
        """``(torch CSR tensor of the stored entries, fill)``: pass both on (``dbscan(csr, eps, k, fill=fill)``)."""
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(self.crow, self.col, self.vals, self.shape, check_invariants=False)
        return csr, self.fill

    def to(self, device) -> SparseDistance:
        return SparseDistance(self.crow.to(device), self.col.to(device), self.vals.to(device), self._n, self.fill)

    def cpu(self) -> SparseDistance:
        return self.to("cpu")

    def __repr__(self) -> str:
        return (f"SparseDistance(shape={tuple(self.shape)}, nnz={self.nnz()}, fill={self.fill}, dtype={self.dtype}, "
                f"device={self.device})")
