"""The op framework: schema mirror, extension loading and fallback, backend selection and its errors."""

import os
import subprocess
import sys

import pytest
import torch

import vireid_fast
from vireid_fast import _extension
from vireid_fast.ops import BackendUnavailableError, _registry
from vireid_fast.ops._schemas import SCHEMAS

CPP_OK = vireid_fast.backends()["cpp"]["available"]


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_python_schema_mirror_matches_extension(name):
    registered = str(getattr(torch.ops.vireid, name).default._schema)
    assert registered == f"vireid::{SCHEMAS[name]}"
    # The C++ kernel is the private twin _<name>_cpu with the same signature (the public op's CPU kernel runs the
    # validation layer, then calls it).
    twin = str(getattr(torch.ops.vireid, f"_{name}_cpu").default._schema)
    assert twin == f"vireid::_{name}_cpu{SCHEMAS[name][len(name):]}"


def test_backends_report():
    info = vireid_fast.backends()
    assert set(info) == {"cpp", "triton", "cuda"}
    for entry in info.values():
        assert isinstance(entry["available"], bool) and entry["reason"]


def test_unknown_backend_value(backend):
    backend("fortran")
    with pytest.raises(ValueError, match="VIREID_BACKEND must be one of"):
        vireid_fast.ops.sinkhorn(torch.rand(3, 3), 1.0)


def test_forced_cpp_on_other_device_is_explicit(backend):
    backend("cpp")
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        _registry.choose_backend("sinkhorn", torch.device("meta"))


def test_forced_triton_without_interpreter_is_explicit(backend, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _registry.choose_backend("sinkhorn", torch.device("cpu"))


def test_cuda_route_without_triton(monkeypatch):
    # Ops whose kernels/ module is plain torch (Jaccard) or a host copy (DBSCAN) keep it when Triton is missing;
    # Triton kernels fall back to the reference.
    monkeypatch.delenv("VIREID_BACKEND", raising=False)
    monkeypatch.setattr(_registry, "triton_status", lambda: (False, "triton is not installed"))
    cuda = torch.device("cuda")
    for op in ("kreciprocal_jaccard", "dbscan_csr", "dbscan_dense"):
        assert _registry.choose_backend(op, cuda) == "triton"
    monkeypatch.setattr(_registry, "_warned", set())
    with pytest.warns(RuntimeWarning, match="uses the reference"):
        assert _registry.choose_backend("cmfp", cuda) == "reference"


def test_auto_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("VIREID_BACKEND", raising=False)
    assert _registry.choose_backend("sinkhorn", torch.device("cpu")) == ("cpp" if CPP_OK else "reference")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("VIREID_BACKEND", None)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_import_without_extension_falls_back_with_one_warning():
    code = (
        "import torch, vireid_fast\n"
        "p = vireid_fast.ops.sinkhorn(torch.rand(5, 4), 2.0)\n"
        "p = vireid_fast.ops.sinkhorn(torch.rand(5, 4), 2.0)\n"
        "print('cpp', vireid_fast.backends()['cpp']['available'], float(p.sum()))\n"
    )
    out = _run_python(code, VIREID_DISABLE_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert "cpp False" in out.stdout
    assert out.stderr.count("C++ kernels unavailable") == 1
    assert "VIREID_DISABLE_EXTENSION" in out.stderr


def test_extension_built_for_another_torch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    fake.write_bytes(b"\x7fELF....VIREID_TORCH_VERSION=1.0.0;....")
    monkeypatch.delenv("VIREID_DISABLE_EXTENSION", raising=False)  # also in the fallback run of make test
    monkeypatch.setattr(_extension, "_library_path", lambda: str(fake))
    monkeypatch.setattr(_extension, "_state", {"tried": False, "loaded": False, "path": None, "reason": ""})
    with pytest.warns(RuntimeWarning, match="built for torch 1.0.0"):
        assert _extension.load() is False
    assert "pip install -e . --no-build-isolation" in _extension.status()[1]


def test_goldens_ship_with_the_tests_and_a_missing_one_fails(golden):
    # The equality tests read tests/golden in every checkout; an absent file must fail them, never skip them.
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
    for name in ("jaccard.npz", "memory.npz", "eval.npz", "cmfp.npz", "README.md"):
        assert os.path.isfile(os.path.join(folder, name)), name
    with pytest.raises(BaseException) as info:  # noqa: PT011 - the outcome type is asserted below
        golden("absent.npz")
    assert info.type is pytest.fail.Exception
