"""The C++ kNN's candidate GEMMs and the range of its inputs.

- The float32-output bf16 GEMM (csrc/common.cpp, reached through the exported ``vireid_gemm_bf16_f32``): exact where
  every partial sum is representable, within the float32 accumulation bound elsewhere, any shape.
- 160 random searches where the bf16 candidate search must return the fp32 one bit for bit (and the brute force).
- Features whose float32 scores overflow or vanish (issue 18: a segfault and an index 785 for N = 2), and NaN/Inf
  reaching the raw ops: every case runs in a subprocess, so a crash is a failure, not the end of the session.
- VIREID_CPU_ISA=avx2 / VIREID_BF16_GEMM=none: the fallback paths give the same bits, silently.
"""

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vireid_fast  # noqa: F401  (loads the extension)
from vireid_fast import _extension
from vireid_fast.ops import knn

CPP_OK = _extension.load()
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def brute_force(x: torch.Tensor, y: torch.Tensor, k: int, metric: str) -> np.ndarray:
    xd, yd = x.double().numpy(), y.double().numpy()
    dots = xd @ yd.T
    key = -dots if metric == "ip" else (xd * xd).sum(1)[:, None] + (yd * yd).sum(1)[None, :] - 2 * dots
    cols = np.arange(y.shape[0])
    return np.stack([np.lexsort((cols, row))[:k] for row in key])


def _gemm_kernel():
    fn = ctypes.CDLL(_extension._state["path"]).vireid_gemm_bf16_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64]
    return fn


GEMMS = {"avx512bf16": 1, "mkl": 2}


def _bf16_gemm(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T by one of the kernels (skips when it is not available here); a, b bf16 with an even width."""
    out = torch.full((a.shape[0], b.shape[0]), float("nan"))
    ran = _gemm_kernel()(GEMMS[kind], out.data_ptr(), out.shape[1], a.data_ptr(), a.shape[0], b.data_ptr(),
                         b.shape[0], a.shape[1])
    if ran == 0:
        pytest.skip(f"no {kind} float32-output bf16 GEMM on this CPU")
    return out


@needs_cpp
def test_our_bf16_gemm_is_available_on_avx512_bf16_cpus():
    ran = _gemm_kernel()(1, None, 1, None, 0, None, 0, 2)  # zero rows: only says whether it would run
    assert (ran == 1) == bool(torch.cpu._is_avx512_bf16_supported())


@needs_cpp
@pytest.mark.parametrize("kind", list(GEMMS))
@pytest.mark.parametrize("rows, width, d", [(1, 1, 2), (13, 31, 6), (14, 32, 2), (15, 33, 258), (29, 47, 300),
                                            (40, 70, 512)])
def test_bf16_gemm_is_exact_on_small_integers(kind, rows, width, d):
    # Integers |v| <= 8: every product and partial sum is an integer below 2^24, so any float32 summation is exact.
    gen = torch.Generator().manual_seed(rows * width + d)
    a = torch.randint(-8, 9, (rows, d), generator=gen).bfloat16()
    b = torch.randint(-8, 9, (width, d), generator=gen).bfloat16()
    assert torch.equal(_bf16_gemm(kind, a, b), (a.double() @ b.double().T).float())


@needs_cpp
@pytest.mark.parametrize("kind", list(GEMMS))
@pytest.mark.parametrize("rows, width, d", [(100, 200, 2048), (33, 65, 130)])
def test_bf16_gemm_error_is_within_the_float32_accumulation_bound(kind, rows, width, d):
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(rows, d, generator=gen).bfloat16()
    b = torch.randn(width, d, generator=gen).bfloat16()
    out = _bf16_gemm(kind, a, b)
    exact = a.double() @ b.double().T
    gamma = (d + 2) * 2.0**-24 / (1 - (d + 2) * 2.0**-24)
    bound = gamma * (a.double().abs() @ b.double().abs().T)
    assert ((out.double() - exact).abs() <= bound).all()
    # No bf16 rounding of the output: far tighter than 2^-8 relative.
    assert (out.double() - exact).abs().max() < 2.0**-16 * exact.abs().max()


def _stress_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    kind = seed % 4
    n = int(torch.randint(1, 140, (1,), generator=gen))
    m = int(torch.randint(1, 160, (1,), generator=gen))
    d = int(torch.randint(1, 70, (1,), generator=gen))
    if kind == 0:  # Gaussian
        x, y = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    elif kind == 1:  # clusters with 1e-6 spread: near-ties far below bf16 resolution
        centres = torch.nn.functional.normalize(torch.randn(5, d, generator=gen), dim=1)
        x = centres[torch.randint(0, 5, (n,), generator=gen)] + 1e-6 * torch.randn(n, d, generator=gen)
        y = centres[torch.randint(0, 5, (m,), generator=gen)] + 1e-6 * torch.randn(m, d, generator=gen)
    elif kind == 2:  # small integers with duplicates: exact ties, broken by the lower index
        base = torch.randint(-3, 4, (7, d), generator=gen).float()
        x, y = base[torch.randint(0, 7, (n,), generator=gen)], base[torch.randint(0, 7, (m,), generator=gen)]
    else:  # rows of very different norms
        x = torch.randn(n, d, generator=gen) * torch.exp(3 * torch.randn(n, 1, generator=gen))
        y = torch.randn(m, d, generator=gen) * torch.exp(3 * torch.randn(m, 1, generator=gen))
    self_search = seed % 8 < 4
    db = x if self_search else y
    k = int(torch.randint(1, db.shape[0] + 1, (1,), generator=gen))
    return x, (None if self_search else y), db, k


def _stress(seeds=range(160)) -> list[int]:
    """Seeds where the bf16 candidate search differs from the fp32 one (or both from the brute force)."""
    os.environ["VIREID_BACKEND"] = "cpp"
    bad = []
    for seed in seeds:
        x, y, db, k = _stress_case(seed)
        metric = "ip" if seed % 2 == 0 else "l2"
        v32, i32 = knn(x, k, y, metric=metric, precision="fp32")
        v16, i16 = knn(x, k, y, metric=metric, precision="bf16")
        same = torch.equal(i32, i16) and torch.equal(v32, v16)
        # l2 keys of 1e-12 between near-duplicates are ordered by the float64 rounding of the definition's summation
        # order, which numpy's BLAS does not follow: there only fp32 == bf16 is asserted.
        if not same or (not (seed % 4 == 1 and metric == "l2")
                        and not np.array_equal(i32.numpy(), brute_force(x, db, k, metric))):
            bad.append(seed)
    return bad


@needs_cpp
@pytest.mark.parametrize("gemm", ["default", "avx512bf16", "mkl"])
def test_bf16_candidates_equal_fp32_on_160_random_searches(gemm, monkeypatch):
    # default: the GEMM this CPU uses (ATen's bf16 GEMM without AMX); the others force a float32-output bf16 GEMM
    # (their bound has no output rounding) in a fresh process, where VIREID_BF16_GEMM is read.
    if gemm == "default":
        monkeypatch.setenv("VIREID_BACKEND", "cpp")
        assert _stress() == []
        return
    out = _run("""
        import json
        from tests.ops.test_knn_precision import _gemm_kernel, _stress
        print(json.dumps([_gemm_kernel()(-1, None, 0, None, 0, None, 0, 2), _stress()]))
    """, {"VIREID_BF16_GEMM": gemm})
    if out[0] != GEMMS[gemm]:
        pytest.skip(f"no {gemm} float32-output bf16 GEMM on this CPU")
    assert out[1] == []


@needs_cpp
def test_rows_of_tiny_norm_among_normal_ones(backend):
    # Rows scaled down to 2^-60..2^-100 (no global rescale: the largest rows are of norm ~1). The bf16 bound needs
    # the norms of their rounding residuals, whose float32 squares would underflow to zero: the search would then
    # miss neighbours (the mutant that accumulates them in float32 fails here).
    backend("cpp")
    gen = torch.Generator().manual_seed(8)
    centres = torch.nn.functional.normalize(torch.randn(8, 24, generator=gen), dim=1)
    x = centres[torch.randint(0, 8, (300,), generator=gen)] + 0.05 * torch.randn(300, 24, generator=gen)
    x = x * torch.pow(2.0, -torch.randint(60, 101, (300, 1), generator=gen).float())
    x[0] = centres[0]  # one row of norm ~1: no global rescale
    # near-ties 1e-3 apart: above float32 resolution, below bf16's
    y = centres[torch.randint(0, 8, (400,), generator=gen)] + 1e-3 * torch.randn(400, 24, generator=gen)
    for metric in ("ip", "l2"):
        for db in (None, y):
            v32, i32 = knn(x, 6, db, metric=metric, precision="fp32")
            v16, i16 = knn(x, 6, db, metric=metric, precision="bf16")
            assert torch.equal(i32, i16) and torch.equal(v32, v16)
            if metric == "ip":
                np.testing.assert_array_equal(i32.numpy(), brute_force(x, x if db is None else db, 6, metric))


def _run(code: str, env: dict | None = None) -> dict:
    """Runs code in a fresh interpreter (a crash fails the test, not the session); it prints one JSON line."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_cpp
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_issue_18_overflow_reproductions(precision):
    out = _run(f"""
        import json, torch, vireid_fast
        from vireid_fast.ops import knn
        res = {{}}
        v, i = knn(torch.tensor([[1.9e19]]), 1, precision="{precision}")
        res["one"] = [v.tolist(), i.tolist()]
        for metric in ("ip", "l2"):
            v, i = knn(torch.tensor([[2e19], [1e19]]), 2, metric=metric, precision="{precision}")
            res[metric] = [v.tolist(), i.tolist()]
        print(json.dumps(res))
    """)
    inf = float("inf")
    assert out["one"] == [[[inf]], [[0]]]  # 3.61e38 is beyond float32: the value is its rounding, +inf
    assert out["ip"][1] == [[0, 1], [0, 1]]
    assert np.allclose(out["ip"][0], [[inf, 2e38], [2e38, 1e38]], rtol=1e-6)
    assert out["l2"][1] == [[0, 1], [1, 0]]
    assert np.allclose(out["l2"][0], [[0, 1e38], [0, 1e38]], rtol=1e-6)


@needs_cpp
@pytest.mark.parametrize("exponent", [-75, -40, 40, 66, 120])
def test_scaled_features_give_the_scaled_search(exponent):
    # A power-of-two scale multiplies every exact score by a power of two: the same neighbours, self and cross, both
    # metrics and precisions, also across several tiles (1,100 rows).
    out = _run(f"""
        import json, torch, vireid_fast
        from vireid_fast.ops import knn
        gen = torch.Generator().manual_seed(1)
        x = torch.nn.functional.normalize(torch.randn(1100, 12, generator=gen), dim=1)
        y = torch.randn(50, 12, generator=gen)
        s = 2.0 ** {exponent}
        res = []
        for metric in ("ip", "l2"):
            for precision in ("fp32", "bf16"):
                _, i_self = knn(x * s, 7, metric=metric, precision=precision)
                _, i_ref = knn(x, 7, metric=metric, precision=precision)
                _, i_cross = knn(x * s, 5, y * s, metric=metric, precision=precision)
                _, i_cref = knn(x, 5, y, metric=metric, precision=precision)
                _, i_mixed = knn(x * s, 5, y, metric="ip", precision=precision)  # only x scaled
                res.append(torch.equal(i_self, i_ref) and torch.equal(i_cross, i_cref)
                           and torch.equal(i_mixed, i_cref if metric == "ip" else knn(x, 5, y)[1]))
        print(json.dumps(res))
    """)
    assert out == [True] * 4


@needs_cpp
def test_rows_whose_scores_pass_float32_range():
    # Rows of norms 2^55..2^68: some scores beyond float32's range, some within (the search without the rescale
    # returned wrong neighbours in 154 of these 160 searches).
    out = _run("""
        import json, torch, vireid_fast
        from vireid_fast.ops import knn
        gen = torch.Generator().manual_seed(3)
        wrong = 0
        for trial in range(40):
            y = torch.randn(60, 4, generator=gen) * torch.pow(2.0, torch.randint(55, 68, (60, 1), generator=gen))
            x = torch.randn(30, 4, generator=gen) * torch.pow(2.0, torch.randint(55, 68, (30, 1), generator=gen))
            xd, yd = x.double(), y.double()
            for metric in ("ip", "l2"):
                key = -(xd @ yd.T) if metric == "ip" else (
                    (xd * xd).sum(1)[:, None] + (yd * yd).sum(1)[None] - 2 * xd @ yd.T)
                ref = torch.sort(key, dim=1, stable=True).indices[:, :5]
                for precision in ("fp32", "bf16"):
                    wrong += not torch.equal(knn(x, 5, y, metric=metric, precision=precision)[1], ref)
        print(json.dumps(wrong))
    """)
    assert out == 0


@needs_cpp
def test_cmfp_and_jaccard_on_overflowing_features():
    out = _run("""
        import json, torch, vireid_fast
        from vireid_fast.ops import cmfp, knn, kreciprocal_jaccard
        from vireid_fast.ops.reference import kreciprocal_jaccard_ref
        gen = torch.Generator().manual_seed(0)
        fv = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
        fr = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
        res = {}
        a = cmfp(fv, fr, 3, return_affinity=True)
        # The weights are scale-invariant; scores of 2^132 are beyond float32, 2^-140 below its normal range. The
        # output rows are F.normalize'd (eps 1e-12 on the unscaled norm, as the reference): identical at 2^66, and at
        # 2^-70 (row norms ~1e-9 < eps) the same directions with norm = row norm / eps.
        for e in (66, -70):
            b = cmfp(fv * 2.0 ** e, fr * 2.0 ** e, 3, return_affinity=True)
            same_weights = torch.equal(a.affinity.values(), b.affinity.values())
            if e > 0:
                res[f"f32_{e}"] = same_weights and torch.equal(a.prop_v, b.prop_v) and torch.equal(a.prop_r, b.prop_r)
            else:
                unit = torch.nn.functional.normalize
                res[f"f32_{e}"] = (same_weights and bool(b.prop_v.norm(dim=1).max() < 1e-6)
                                   and torch.allclose(unit(b.prop_v.double(), dim=1), a.prop_v.double(), atol=1e-6)
                                   and torch.allclose(unit(b.prop_r.double(), dim=1), a.prop_r.double(), atol=1e-6))
        c = cmfp(fv.double(), fr.double(), 3)
        d = cmfp(fv.double() * 2.0 ** 700, fr.double() * 2.0 ** 700, 3)
        res["f64"] = torch.equal(c.prop_v, d.prop_v) and torch.equal(c.prop_r, d.prop_r)
        f = fv * 2.0 ** 66
        sim, rank = knn(f, 5)
        got = torch.ops.vireid.kreciprocal_jaccard(f, rank, sim, 3, None)
        ref = kreciprocal_jaccard_ref(f, rank, sim, 3, None)
        res["jaccard_finite"] = bool(torch.isfinite(kreciprocal_jaccard(f, 5, 3)).all())
        res["jaccard_ref"] = all(torch.equal(u, v) for u, v in zip(got, ref))
        print(json.dumps(res))
    """)
    assert out == {"f32_66": True, "f32_-70": True, "f64": True, "jaccard_finite": True, "jaccard_ref": True}


@needs_cpp
def test_raw_ops_reject_nan_and_inf_with_a_value_error():
    out = _run("""
        import json, torch, vireid_fast
        res = []
        good = torch.randn(6, 4)
        for bad_value in (float("inf"), float("-inf"), float("nan")):
            bad = good.clone()
            bad[3, 1] = bad_value
            calls = [lambda: torch.ops.vireid.knn(bad, good, 2, "ip", "fp32"),
                     lambda: torch.ops.vireid.knn(good, bad, 2, "l2", "bf16"),
                     lambda: torch.ops.vireid.knn(bad, bad, 2, "ip", "bf16"),
                     lambda: torch.ops.vireid.cmfp(bad, good, 2),
                     lambda: torch.ops.vireid.cmfp(good.double(), bad.double(), 2)]
            for call in calls:
                try:
                    call()
                    res.append("no error")
                except ValueError as exc:
                    res.append("NaN or Inf" in str(exc))
        print(json.dumps(res))
    """)
    assert out == [True] * 15


@needs_cpp
@pytest.mark.parametrize("env", [{"VIREID_CPU_ISA": "avx2"}, {"VIREID_CPU_ISA": "baseline"},
                                 {"VIREID_BF16_GEMM": "none"}, {"VIREID_BF16_GEMM": "avx512bf16"},
                                 {"VIREID_BF16_GEMM": "mkl"}])
def test_fallback_paths_give_the_same_bits_without_warnings(env):
    code = """
        import json, torch, vireid_fast
        from vireid_fast.ops import cmfp, knn
        from vireid_fast.ops.knn import _bf16_worthwhile
        gen = torch.Generator().manual_seed(4)
        centres = torch.nn.functional.normalize(torch.randn(30, 64, generator=gen), dim=1)
        x = centres[torch.randint(0, 30, (1500,), generator=gen)] + 0.05 * torch.randn(1500, 64, generator=gen)
        out = {"auto_bf16": _bf16_worthwhile(torch.empty(2**15, 2**10), 2**15)}
        for precision in ("fp32", "bf16"):
            v, i = knn(x, 9, metric="l2", precision=precision)
            out[precision] = [v.sum().item(), i.sum().item(), i[::97].tolist()]
        p = cmfp(x[:800], x[800:], 5)
        out["cmfp"] = p.prop_v.double().sum().item()
        print(json.dumps(out))
    """
    base = _run(code)
    other = _run(code, env)
    assert base["fp32"] == base["bf16"] == other["fp32"] == other["bf16"]
    if env.get("VIREID_CPU_ISA") == "baseline":
        # CMFP's float32 propagation (w * x + out) is fused into FMAs by the AVX2/AVX-512 builds only: last bits differ
        assert base["cmfp"] == pytest.approx(other["cmfp"], rel=1e-6)
    else:
        assert base["cmfp"] == other["cmfp"]
    if "VIREID_CPU_ISA" in env:
        assert other["auto_bf16"] is False  # no bf16 search on a CPU simulated without it
