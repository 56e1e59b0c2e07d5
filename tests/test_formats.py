"""How each format stores a linear weight, checked on weights small enough to work out by hand,
then on random ones (error bounds, scale dtypes) and against transformers' own FP8 dequantizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mixload.core.errors import ConfigError, SourceError
from mixload.core.formats import Awq, CtFp8, CtInt4, Fp8, Gptq, Unquantized, WeightFormat, detect
from mixload.core.formats.awq import ORDER
from mixload.core.formats.base import FLOAT_DTYPES, pack_int, torch_dtype, unpack_int
from mixload.core.formats.gptq import dequantize_int, quantize_int

ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.float8_e4m3fn: "F8_E4M3", torch.int32: "I32", torch.int64: "I64"}


def word(hex_value: int) -> int:
    """An int32 written as the unsigned hex a hex dump shows (0xFEDCBA98 is negative as int32)."""
    return hex_value - 2**32 if hex_value >= 2**31 else hex_value


def label(fmt: WeightFormat) -> str:
    return repr(fmt)


def random_weight(out: int = 128, inp: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=g) * 0.02).to(torch.bfloat16)


# ---- packing

def test_int4_packs_the_first_value_into_the_lowest_nibble():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_int(q, 4, dim=1).tolist() == [[word(0x87654321)]]
    assert pack_int(q.T, 4, dim=0).tolist() == [[word(0x87654321)]]   # along the other dim
    assert pack_int(torch.tensor([[1, 2, 3, 4]]), 8, dim=1).tolist() == [[0x04030201]]


def test_awq_interleaves_nibbles_0_2_4_6_1_3_5_7():
    # Bits [4k, 4k+4) hold value ORDER[k]: values 0..7 read 0,2,4,6,1,3,5,7 from the low end.
    assert pack_int(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]), 4, dim=1, order=ORDER).tolist() \
        == [[word(0x75316420)]]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_unpack_inverts_pack(data: st.DataObject):
    bits = data.draw(st.sampled_from([4, 8]), label="bits")
    order = data.draw(st.sampled_from([None, ORDER]), label="order") if bits == 4 else None
    dim = data.draw(st.sampled_from([0, 1]), label="dim")
    shape = [data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))]
    shape[dim] *= 32 // bits
    q = torch.from_numpy(data.draw(arrays(np.int32, shape, elements=st.integers(0, 2**bits - 1))))
    packed = pack_int(q, bits, dim, order)
    assert packed.dtype == torch.int32 and packed.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(unpack_int(packed, bits, dim, order), q)


def test_values_that_do_not_fit_are_refused():
    with pytest.raises(ValueError):
        pack_int(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4, dim=1)


# ---- int4 layouts, worked by hand

# Every row quantizes to q = 0..15 with scale o+1 (o = output row):
# symmetric: the row spans [-7.5, 7] * (o+1), amax 7.5 (o+1), scale 2 * amax / 15 = o+1, zero 8;
# -7.5 rounds half-to-even to -8, so q runs 0..15 (and -7.5 comes back as -8, half a step off).
SYM = torch.tensor([-7.5] + list(range(-7, 8)), dtype=torch.float32) * torch.arange(1., 9.)[:, None]
# asymmetric: row o runs from -(o+1) to 14-o: scale 1, zero o+1, q = w + o + 1 = 0..15.
ASYM = torch.arange(16.)[None, :] - torch.arange(1., 9.)[:, None]
Q_WORDS = [word(0x76543210), word(0xFEDCBA98)]   # 0..15 packed, 8 to a word


def test_gptq_symmetric_v1_by_hand():
    t = Gptq(group_size=16).quantize(SYM)
    assert t["qweight"].tolist() == [[Q_WORDS[0]] * 8, [Q_WORDS[1]] * 8]  # [in/8, out]: along in
    assert t["qzeros"].tolist() == [[0x77777777]]          # zero 8 stored as 8-1 (v1)
    assert t["scales"].dtype == torch.float16 and t["scales"].tolist() == [list(range(1, 9))]
    assert t["g_idx"].tolist() == [0] * 16
    expected = SYM.clone()
    expected[:, 0] = -8 * torch.arange(1., 9.)
    assert torch.equal(Gptq(group_size=16).dequantize(t), expected)


def test_gptq_v2_stores_the_zero_itself():
    assert Gptq(group_size=16, checkpoint_format="gptq_v2").quantize(SYM)["qzeros"].tolist() \
        == [[word(0x88888888)]]


@pytest.mark.parametrize("fmt, zeros_key, zeros", [
    # zeros 1..8 along the outputs; GPTQ packs them in order, v1 one less
    (Gptq(group_size=16, sym=False), "qzeros", [[word(0x76543210)]]),
    (Gptq(group_size=16, sym=False, checkpoint_format="gptq_v2"), "qzeros", [[word(0x87654321)]]),
    # AWQ interleaves: nibbles hold the zeros of outputs 0,2,4,6,1,3,5,7 = 1,3,5,7,2,4,6,8
    (Awq(group_size=16), "qzeros", [[word(0x86427531)]]),
    # compressed-tensors: signed zero o+1-8 stored +8, packed along out: [out/8, groups]
    (CtInt4(group_size=16, symmetric=False), "weight_zero_point", [[word(0x87654321)]]),
], ids=["gptq-v1", "gptq-v2", "awq", "ct"])
def test_asymmetric_zero_points_by_hand(fmt: WeightFormat, zeros_key: str, zeros: list):
    t = fmt.quantize(ASYM)
    assert t[zeros_key].tolist() == zeros
    assert torch.equal(fmt.dequantize(t), ASYM)          # scale 1, every value on the grid


def test_where_each_int_format_puts_the_same_q():
    # q = 0..15 along the inputs of every row; the layouts differ only in where the words go.
    gptq = Gptq(group_size=16, sym=False, checkpoint_format="gptq_v2").quantize(ASYM)
    assert gptq["qweight"].tolist() == [[Q_WORDS[0]] * 8, [Q_WORDS[1]] * 8]        # [in/8, out]
    ct = CtInt4(group_size=16, symmetric=False).quantize(ASYM)
    assert ct["weight_packed"].tolist() == [Q_WORDS] * 8                            # [out, in/8]
    assert ct["weight_shape"].tolist() == [8, 16] and ct["weight_shape"].dtype == torch.int64
    awq = Awq(group_size=16).quantize(ASYM)                                         # [in, out/8]
    assert awq["qweight"].tolist() == [[word(i * 0x11111111)] for i in range(16)]
    assert awq["scales"].shape == (1, 8) and ct["weight_scale"].shape == (8, 1)


def test_compressed_tensors_symmetric_stores_q_plus_8():
    t = CtInt4(group_size=16).quantize(SYM)
    assert t["weight_packed"].tolist() == [Q_WORDS] * 8   # signed -8..7, stored +8 = 0..15
    assert "weight_zero_point" not in t                   # symmetric: the zero is implied
    assert t["weight_scale"].dtype == torch.bfloat16
    assert t["weight_scale"].flatten().tolist() == list(range(1, 9))


def test_awq_interleave_shows_in_qweight_when_q_varies_along_the_outputs():
    w = (torch.arange(8.)[:, None] + torch.arange(16.)[None, :]) % 16  # q[o, i] = (o + i) % 16
    t = Awq(group_size=16).quantize(w)
    assert t["qweight"][0].tolist() == [word(0x75316420)]   # outputs 0..7 of input 0
    assert t["qweight"][1].tolist() == [word(0x86427531)]   # outputs 1..8 of input 1
    assert torch.equal(Awq(group_size=16).dequantize(t), w)


def test_gptq_v1_cannot_store_zero_0_so_it_keeps_zero_1():
    w = torch.arange(16.).repeat(8, 1)             # no negatives: the exact zero would be 0
    v2 = Gptq(group_size=16, sym=False, checkpoint_format="gptq_v2")
    assert torch.equal(v2.dequantize(v2.quantize(w)), w)
    v1 = Gptq(group_size=16, sym=False)
    t = v1.quantize(w)
    assert t["qzeros"].tolist() == [[0]]           # zero 1, stored as 0
    err = (v1.dequantize(t) - w).abs()
    assert err[:, :15].max() == 0 and err[:, 15].tolist() == [1.0] * 8   # top value: one step


# ---- FP8, worked by hand

def test_fp8_block_scale_inv_is_block_amax_over_448():
    w = torch.zeros(256, 384)                      # 2 x 3 blocks of 128 x 128
    w[0, 0] = 448.0                                # block (0, 0): scale_inv 1
    w[5, 130] = -896.0                             # block (0, 1): scale_inv 2, stored q -448
    w[200, 300] = 0.5                              # block (1, 2): scale_inv 0.5 / 448
    t = Fp8().quantize(w)
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale_inv"].dtype == torch.float32
    # all-zero blocks store 1: nothing to scale, and nothing divides by zero
    assert t["weight_scale_inv"].tolist() == [[1.0, 2.0, 1.0],
                                              [1.0, 1.0, torch.tensor(0.5 / 448).item()]]
    assert t["weight"][5, 130].float().item() == -448.0
    assert torch.equal(Fp8().dequantize(t), w)


def test_fp8_partial_edge_blocks():
    w = random_weight(200, 300).float()
    t = Fp8().quantize(w)
    assert t["weight_scale_inv"].shape == (2, 3)                 # ceil(200/128), ceil(300/128)
    assert t["weight_scale_inv"][1, 2] == w[128:, 256:].abs().max() / 448


def test_fp8_channel_and_tensor_scales():
    w = random_weight(16, 256).float()
    channel = CtFp8(strategy="channel", block=None).quantize(w)
    assert channel["weight_scale"].shape == (16, 1) and channel["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(channel["weight_scale"], (w.abs().amax(1, keepdim=True) / 448).bfloat16())
    assert Fp8(strategy="tensor", block=None).quantize(w)["weight_scale"].shape == ()
    assert CtFp8(strategy="tensor", block=None).quantize(w)["weight_scale"].shape == (1,)


def test_fp8_block_dequantize_matches_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    reference = getattr(Fp8Dequantize(None), "_dequantize_one", None)
    if reference is None:
        pytest.skip("this transformers has no Fp8Dequantize._dequantize_one")
    t = Fp8().quantize(random_weight(256, 384))
    ours = Fp8().dequantize(t)
    assert torch.equal(reference(t["weight"], t["weight_scale_inv"], torch.float32), ours)


def test_fp8_static_activations_need_calibration():
    fmt = Fp8(activation_scheme="static")
    with pytest.raises(ConfigError, match="calibration"):
        fmt.quantize(random_weight(128, 128))
    x = torch.randn(32, 128)
    x[3, 7] = 896.0
    assert fmt.quantize(random_weight(128, 128), calib=x)["input_scale"].item() == 2.0


# ---- every format, on random weights

FORMATS = [Fp8(), Fp8(strategy="tensor", block=None), CtFp8(strategy="channel", block=None),
           CtFp8(), Gptq(), Gptq(sym=False, checkpoint_format="gptq_v2"), Gptq(desc_act=True),
           Awq(), Awq(zero_point=False), CtInt4(), CtInt4(symmetric=False), CtInt4(group_size=-1),
           Unquantized()]


@pytest.mark.parametrize("fmt", FORMATS, ids=label)
def test_quantize_writes_exactly_the_tensors_the_format_declares(fmt: WeightFormat):
    t = fmt.quantize(random_weight())
    assert {k: tuple(v.shape) for k, v in t.items()} == fmt.tensor_shapes(128, 256)
    allowed = fmt.tensor_dtypes()
    assert all(ST_NAMES[v.dtype] in allowed[k] for k, v in t.items())


ERROR_BOUNDS = {"fp8": 0.03, "ct-fp8": 0.03, "gptq": 0.12, "awq": 0.12, "ct-int4": 0.13,
                "unquantized": 1e-6}


@pytest.mark.parametrize("fmt", FORMATS, ids=label)
def test_round_trip_relative_error(fmt: WeightFormat):
    w = random_weight()
    err = (fmt.dequantize(fmt.quantize(w)) - w.float()).norm() / w.float().norm()
    assert err < ERROR_BOUNDS[fmt.name]


@pytest.mark.parametrize("sym", [True, False])
def test_int_rounding_error_is_at_most_half_a_step(sym: bool):
    w = random_weight().float()
    r = quantize_int(w, bits=4, group_size=128, sym=sym, scale_dtype="F32")
    step = r.scale.float()[:, r.g_idx.long()]
    assert ((dequantize_int(r.q, r.scale, r.zero, r.g_idx) - w).abs() <= step * (0.5 + 1e-5)).all()


def test_fp8_rounding_error_is_at_most_half_an_e4m3_step():
    w = random_weight().float()
    t = Fp8().quantize(w)
    scale = t["weight_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
    # 3 mantissa bits: half a step is 2**-4 relative; subnormals are spaced 2**-9 (times scale).
    bound = w.abs() * 2**-4 + scale * 2**-10
    assert ((Fp8().dequantize(t) - w).abs() <= bound).all()


SCALED = [f for f in FORMATS if not isinstance(f, Unquantized)]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("fmt", SCALED, ids=label)
def test_scales_come_in_the_dtype_asked_for_and_are_read_back_from_the_tensor(fmt, dtype):
    t = fmt.quantize(random_weight(), scale_dtype=dtype)
    scales = [k for k in t if fmt.tensor_dtypes()[k] == FLOAT_DTYPES]
    assert scales and all(t[k].dtype == torch_dtype(dtype) for k in scales)
    # The same values in another dtype dequantize the same: nothing assumes the dtype.
    widened = {k: v.float() if k in scales else v for k, v in t.items()}
    assert torch.equal(fmt.dequantize(t), fmt.dequantize(widened))


def test_default_scale_dtypes_follow_each_ecosystem():
    w = random_weight()
    assert Gptq().quantize(w)["scales"].dtype == torch.float16
    assert Awq().quantize(w)["scales"].dtype == torch.float16
    assert Fp8().quantize(w)["weight_scale_inv"].dtype == torch.float32
    assert CtInt4().quantize(w)["weight_scale"].dtype == torch.bfloat16


def test_weights_a_format_cannot_store_are_refused():
    with pytest.raises(ConfigError, match="multiple of group 96"):
        Gptq(group_size=96).quantize(random_weight())


# ---- GPTQ with calibration

def correlated_activations(n: int = 256, inp: int = 256, seed: int = 1) -> torch.Tensor:
    """Inputs like a real layer's: low-rank structure and a few large channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ torch.randn(32, inp, generator=g)
    x += 0.3 * torch.randn(n, inp, generator=g)
    x[:, torch.randperm(inp, generator=g)[:8]] *= 10
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ (w.float() - approx).T).norm() / (x @ w.float().T).norm())


@pytest.mark.parametrize("fmt", [Gptq(), Gptq(desc_act=True), CtInt4(), Awq()], ids=label)
def test_gptq_with_calibration_halves_the_layer_output_error_of_rtn(fmt: WeightFormat):
    w, x = random_weight(64, 256), correlated_activations()
    rtn = output_error(x, w, fmt.dequantize(fmt.quantize(w)))
    gptq = output_error(x, w, fmt.dequantize(fmt.quantize(w, calib=x)))
    assert gptq < rtn / 2


def test_act_order_quantizes_the_largest_inputs_first_and_records_their_groups():
    w, x = random_weight(64, 256), correlated_activations()
    t = Gptq(desc_act=True).quantize(w, calib=x)
    g_idx = t["g_idx"]
    assert sorted(g_idx.tolist()) == [g for g in range(2) for _ in range(128)]   # 2 full groups
    assert g_idx.tolist() != sorted(g_idx.tolist())                               # but permuted
    largest = (x * x).sum(0).argsort(descending=True)[:128]
    assert (g_idx[largest] == 0).all()                                            # group 0 first
    # Dequantizing needs g_idx: the sequential guess is wrong for act-order weights.
    sequential = {k: v for k, v in t.items() if k != "g_idx"}
    assert not torch.equal(Gptq().dequantize(sequential), Gptq().dequantize(t))


# ---- quantization_config round trips through detect()

@pytest.mark.parametrize("fmt", [
    CtInt4(), CtInt4(symmetric=False), CtInt4(group_size=-1), CtInt4(bits=8, group_size=32),
    CtFp8(), CtFp8(strategy="channel", block=None), CtFp8(strategy="tensor", block=None),
    CtFp8(strategy="tensor", block=None, activation_scheme="static"),
    Fp8(), Gptq(), Gptq(sym=False, desc_act=True, checkpoint_format="gptq_v2"), Awq(),
], ids=label)
def test_quantization_config_round_trips_through_detect(fmt: WeightFormat):
    ignore = ["model.layers.0.mlp.gate", "lm_head"]
    qc = fmt.quantization_config(ignore)
    assert detect(qc) == [fmt]
    assert ignore in (qc.get("ignore"), qc.get("modules_to_not_convert"))


def test_compressed_tensors_config_looks_like_llm_compressors():
    qc = CtInt4().quantization_config(["lm_head"])
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                "strategy": "group", "group_size": 128, "dynamic": False,
                                "actorder": None, "observer": "minmax"}
    fp8 = CtFp8().quantization_config([])
    assert fp8["format"] == "float-quantized"
    assert fp8["config_groups"]["group_0"]["weights"]["block_structure"] == [128, 128]


# ---- every quantization_config field is type- and range-checked

def _ct(fields: dict, **group: object) -> dict:
    qc = CtInt4().quantization_config([])
    qc["config_groups"]["group_0"]["weights"].update(fields)
    qc["config_groups"]["group_0"].update(group)
    return qc


GPTQ = Gptq().quantization_config([])
BAD_CONFIGS = {   # quantization_config -> the key the error names
    "gptq group_size 0": ({**GPTQ, "group_size": 0}, "group_size = 0"),
    "gptq group_size -2": ({**GPTQ, "group_size": -2}, "group_size = -2"),
    "gptq bits 3": ({**GPTQ, "bits": 3}, "bits = 3"),
    "gptq bits 0": ({**GPTQ, "bits": 0}, "bits = 0"),
    "gptq bits true": ({**GPTQ, "bits": True}, "bits = True"),
    "gptq bits 4.0": ({**GPTQ, "bits": 4.0}, "bits = 4.0"),
    "gptq bits '4'": ({**GPTQ, "bits": "4"}, "bits = '4'"),
    "gptq sym 'yes'": ({**GPTQ, "sym": "yes"}, "sym = 'yes'"),
    "awq bits 8": ({"quant_method": "awq", "version": "gemm", "bits": 8}, "bits = 8"),
    "awq w_bit 7": ({"quant_method": "awq", "w_bit": 7}, "w_bit = 7"),
    "awq q_group_size 0": ({"quant_method": "awq", "q_group_size": 0}, "q_group_size = 0"),
    "awq version 5": ({"quant_method": "awq", "version": 5}, "AWQ version 5"),
    "fp8 block [0, 128]": ({"quant_method": "fp8", "weight_block_size": [0, 128]},
                           r"weight_block_size\[0\] = 0"),
    "fp8 block [128, -1]": ({"quant_method": "fp8", "weight_block_size": [128, -1]},
                            r"weight_block_size\[1\] = -1"),
    "fp8 block [128]": ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    "fp8 block [128]*3": ({"quant_method": "fp8", "weight_block_size": [128] * 3},
                          "weight_block_size"),
    "fp8 block 128": ({"quant_method": "fp8", "weight_block_size": 128}, "weight_block_size"),
    "fp8 e5m2": ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt = 'e5m2'"),
    "fp8 scheme": ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
    "ct group_size 0": (_ct({"group_size": 0}), "config_groups.group_0.weights.group_size = 0"),
    "ct group_size null": (_ct({"group_size": None}), "weights.group_size = None"),
    "ct num_bits 4.0": (_ct({"num_bits": 4.0}), "weights.num_bits = 4.0"),
    "ct tensor int": (_ct({"strategy": "tensor"}), "strategy 'tensor'"),
    "ct fp8 block [128, 0]": (CtFp8().quantization_config([]) | {"config_groups": {"g": {
        "weights": {"type": "float", "num_bits": 8, "strategy": "block",
                    "block_structure": [128, 0]}}}}, r"block_structure\[1\] = 0"),
    "ct weights a list": (_ct({}, weights=[4]), "config_groups.group_0.weights is a list"),
    "ct groups a string": ({"quant_method": "compressed-tensors", "config_groups": "w4a16"},
                           "config_groups is a string"),
    "a list": ([{"quant_method": "fp8"}], "quantization_config is a list, not an object"),
    "a string": ("fp8", "quantization_config is a string, not an object"),
    "no quant_method": ({"bits": 4}, "has no quant_method"),
}


@pytest.mark.parametrize("qc, why", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_quantization_configs_name_the_field(qc: object, why: str):
    with pytest.raises(SourceError, match=why) as err:
        detect(qc, "m/config.json")
    assert err.value.file == "m/config.json" and err.value.fix


def test_quantization_config_spellings_of_each_tool():
    assert detect({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}) \
        == [Awq(group_size=64)]
    assert detect({"quant_method": "fp8", "weight_block_size": None}) \
        == [Fp8(strategy="tensor", block=None)]
    assert detect({**GPTQ, "group_size": -1, "damp_percent": 0.01}) == [Gptq(group_size=-1)]
    assert detect(None) == []
