#!/usr/bin/env python3
"""Reference dequantization of GGUF K-quant blocks, from the `gguf` package (gguf-py,
llama.cpp's own Python reader): `pip install gguf==0.19.0`, then run from the repository
root. Not run in CI; its output is committed under tests/fixtures/kquants/.

Any bit pattern is a valid K-quant block once its f16 scale fields are finite, so the
blocks are random bytes with sane scales; each type gets 4 blocks (1024 values).
For each TYPE it writes TYPE.bin (the raw blocks) and TYPE.f32 (gguf-py's dequantized
values, little-endian float32).
"""
import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(2026)
out = "tests/fixtures/kquants"
# Byte offsets of the f16 scale fields inside each block.
scale_fields = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
for ty, fields in scale_fields.items():
    block_values, block_bytes = GGML_QUANT_SIZES[ty]
    blocks = rng.integers(0, 256, size=(4, block_bytes), dtype=np.uint8)
    for f in fields:
        scales = rng.uniform(-0.05, 0.05, size=4).astype(np.float16).view(np.uint8).reshape(4, 2)
        blocks[:, f:f + 2] = scales
    values = dequantize(blocks.reshape(-1), ty).astype("<f4")
    assert values.size == 4 * block_values and np.isfinite(values).all()
    blocks.tofile(f"{out}/{ty.name}.bin")
    values.tofile(f"{out}/{ty.name}.f32")
    print(ty.name, blocks.shape, float(np.abs(values).max()))
