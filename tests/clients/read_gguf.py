"""Reads a GGUF file with gguf-py (llama.cpp's own reader) and prints, as JSON, its architecture
and, per tensor, the type, the row-major shape and the sum and absolute sum of the values
gguf-py dequantizes (tests/quantize.rs compares them with zturbo's reading of the same file)."""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

reader = GGUFReader(sys.argv[1])
field = reader.get_field("general.architecture")
arch = bytes(field.parts[field.data[-1]]).decode() if field is not None else None
tensors = {}
for t in reader.tensors:
    values = dequantize(t.data, t.tensor_type).astype(np.float64)
    tensors[t.name] = {
        "type": t.tensor_type.name,
        "shape": [int(d) for d in reversed(t.shape)],
        "sum": float(values.sum()),
        "abs_sum": float(np.abs(values).sum()),
    }
print(json.dumps({"architecture": arch, "tensors": tensors}))
