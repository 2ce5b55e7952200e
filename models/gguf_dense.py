"""A GGUF's quantized weights written out dense (F16), for llama.cpp's CPU kernels.

llama.cpp multiplies Q4_0/Q4_1/Q8_0 weights by activations it first quantizes to 8 bits;
on the default model (SmolLM2-135M, 4-bit as shipped) that extra rounding turns the
quickstart's answer into nonsense ("L'Étoile, la Marseillaise, ..."), whether the weights
are Q4_1 or requantized to Q8_0. Dequantized to F16 the same weights answer right: F16
keeps every value of a Q4_1 block (a 4-bit integer times an F16 scale plus an F16
minimum) within F16's rounding. Measured on a 2-core AVX2 CPU (docs/design-notes.md):
F16 93 tokens/s, Q4_1 106 (wrong answer), F32 58.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from loguru import logger

_DENSE = ("F32", "F16", "BF16")


def write_dense_gguf(source: Path, dest: Path) -> None:
    """Write `source` to `dest` with every quantized tensor dequantized to F16 (other tensors
    and all metadata as they are), renamed into place so it is never seen half-written."""
    import gguf

    reader = gguf.GGUFReader(source)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    writer = gguf.GGUFWriter(partial, str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    for field in reader.fields.values():
        # The architecture and the GGUF.* header fields are the writer's own.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    dequantized = 0
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        if qtype.name in _DENSE:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=qtype)
            continue
        dense = gguf.quants.dequantize(tensor.data, qtype)
        writer.add_tensor(tensor.name, dense.astype(np.float16))
        dequantized += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, dest)
    logger.bind(source=str(source), dest=str(dest)).info("wrote {} tensors dequantized to F16", dequantized)
