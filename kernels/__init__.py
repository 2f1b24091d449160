"""Triton kernels of vireid_fast, one module per op, installed as ``vireid_fast.kernels``.

Each module exposes ``launch(*schema_args)`` with the same arguments and results as the op's reference in
``vireid_fast.ops.reference``. On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (for testing).
"""
