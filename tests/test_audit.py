"""The audit's sentinel check on plain tensors: what loading left unwritten is found, in any
dtype, however large the parameter (counted a slice at a time)."""
from __future__ import annotations

import torch

from mixload.core import audit


def test_unwritten_elements_are_found_in_float_and_int_parameters():
    params = {"w": torch.empty(4, 8, dtype=torch.bfloat16), "qweight": torch.empty(16, dtype=torch.int32)}
    audit.arm(params)
    params["w"][:3] = 1.0          # the loader filled three rows of four
    params["qweight"].fill_(7)     # and every packed word
    assert audit.unfilled(params) == {"w": 0.25}


def test_a_parameter_larger_than_one_counting_slice_is_counted_exactly():
    n = audit._COUNT_CHUNK * 2 + 5
    p = torch.empty(n, dtype=torch.float16)
    audit.arm({"p": p})
    p[: n - 9] = 0.5               # the last 9 elements, across the slice boundary, never loaded
    assert audit.unfilled({"p": p}) == {"p": 9 / n}
    p[:] = 0.5
    assert audit.unfilled({"p": p}) == {}
