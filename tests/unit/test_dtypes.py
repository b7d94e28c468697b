"""Dtype codes: safetensors names where they exist, every byte-sized torch dtype covered."""
import pytest
import torch

from pyckpt import dtypes
from pyckpt.errors import CorruptCheckpointError

# Written from the safetensors spec, not from pyckpt.dtypes.
SAFETENSORS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}


@pytest.mark.parametrize("code, dt", SAFETENSORS.items())
def test_safetensors_codes(code, dt):
    assert dtypes.code_of(dt) == code
    assert dtypes.dtype_of(code) is dt


def test_every_non_quantized_torch_dtype_has_a_code():
    all_dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    quantized = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
    missing = [d for d in all_dtypes - quantized if dtypes.code_of(d) is None]
    assert missing == []
    assert len(set(dtypes.DTYPE_TO_CODE.values())) == len(dtypes.DTYPE_TO_CODE)


def test_unknown_code_is_reported_as_corrupt_or_newer():
    with pytest.raises(CorruptCheckpointError, match="F128"):
        dtypes.dtype_of("F128", "x.json")
