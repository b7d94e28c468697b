"""Generate tests/format/v1/ once (kept in git). Do not regenerate for a new pyckpt:
the point of the golden checkpoint is that files written by 0.1.0 load forever.

    python tests/format/make_golden_v1.py
"""
import math
import os
import shutil

import torch

import pyckpt

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v1")


def golden_state():
    base = torch.arange(8, dtype=torch.float16)
    return {
        "model": {
            "w": torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.float32),
            "b": torch.tensor([1.0, -0.5, 2.0], dtype=torch.bfloat16),
            "idx": torch.tensor([1, -2, 3_000_000_000], dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.tensor([0, 255, 7], dtype=torch.uint8),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "even": base[0::2], "odd": base[1::2],
            "z": torch.tensor([1 + 2j], dtype=torch.complex64),
        },
        "meta": {"step": 7, "lr": 0.001, "name": "golden", "betas": (0.9, 0.999), "ids": {0: "a", 1: "b"},
                 "inf": math.inf, "dtype": torch.float16, "size": torch.Size([2, 3]), "blob": b"\x00\x01",
                 "none": None, "flags": [True, False]},
    }


def main():
    shutil.rmtree(HERE, ignore_errors=True)
    ck = pyckpt.Checkpointer(HERE, keep=1)
    ck.save(7, golden_state(), rank_state={"rng": torch.tensor([9, 8, 7], dtype=torch.uint8), "epoch": 3}).result(60)
    zs = {"zeros": torch.zeros(4096, dtype=torch.float32), "ramp": torch.arange(512, dtype=torch.int16)}
    pyckpt.save(zs, os.path.join(HERE, "zstd-example"), compress="zstd")


if __name__ == "__main__":
    main()
