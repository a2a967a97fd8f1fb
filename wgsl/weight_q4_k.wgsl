// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them after blocks.wgsl: ggml's Q4_K
// super-blocks of 256 weights (8 sub-blocks of 32) as
// WebGpuBackend.uploadQuantizedMatrix repacks them, 38 u32s each (152 bytes
// against ggml's 144): d and dmin widened to f32, the 8 sub-blocks' 6-bit
// scales sc a byte each (2 words), then their mins m likewise (2 words), which
// spares the shader ggml's 12-byte bit packing, then ggml's 128 bytes of
// 4-bit values q unchanged (sub-blocks 2i and 2i + 1 in the low and high
// nibbles of bytes 32i to 32i + 31). Weight (d·sc)·q − dmin·m.
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  let at = q4_kWords(k);
  return q4_kQuad(k, weight[at.x], weight[at.x + 1u], weight[at.y], weight[at.z], weight[at.w]);
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
