"""Dtype codes of the checkpoint format (docs/FORMAT.md "Dtypes").

Codes follow safetensors where safetensors has one (F32, BF16, I64, ...);
the remaining torch dtypes get documented names. Only dtypes with a fixed
whole-byte item size are listed, because tensors are moved as raw bytes.
"""
from __future__ import annotations

import torch

from .errors import CorruptCheckpointError

# (code, torch attribute name). Attributes a torch build lacks are skipped, so
# an older torch still reads every checkpoint whose dtypes it knows.
_TABLE: tuple[tuple[str, str], ...] = (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3_FNUZ", "float8_e4m3fnuz"), ("F8_E5M2_FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"), ("F4_E2M1_X2", "float4_e2m1fn_x2"),
    ("C32", "complex32"), ("C64", "complex64"), ("C128", "complex128"),
    ("BOOL", "bool"),
    ("I8", "int8"), ("I16", "int16"), ("I32", "int32"), ("I64", "int64"),
    ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
    ("B8", "bits8"), ("B16", "bits16"), ("B1X8", "bits1x8"), ("B2X4", "bits2x4"), ("B4X2", "bits4x2"),
    # torch's sub-byte placeholder dtypes store one element per byte.
    *((f"U{n}", f"uint{n}") for n in range(1, 8)),
    *((f"I{n}", f"int{n}") for n in range(1, 8)),
)

CODE_TO_DTYPE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _TABLE if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in CODE_TO_DTYPE.items()}
# The codes a NumPy array can have (docs/FORMAT.md §8, tag "ndarray"): NumPy's bool and numeric dtypes.
NUMPY_CODES = frozenset(("F64", "F32", "F16", "C64", "C128", "BOOL", "I8", "I16", "I32", "I64", "U8", "U16", "U32",
                         "U64"))


def code_of(dtype: torch.dtype) -> str | None:
    """The format code of ``dtype``, or None when it cannot be stored (quantized dtypes)."""
    return DTYPE_TO_CODE.get(dtype)


def dtype_of(code: str, where: str | None = None) -> torch.dtype:
    """The torch dtype for a format code; unknown codes are a corrupt (or newer) checkpoint."""
    try:
        return CODE_TO_DTYPE[code]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(
            f"unknown dtype code {code!r} in {where}: written by a newer pyckpt or torch?", path=where
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return dtype.itemsize
