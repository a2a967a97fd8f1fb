// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: ggml's Q4_0 blocks of 32 weights as
// WebGpuBackend.uploadQuantizedMatrix repacks them, 5 u32s a block (20 bytes
// against ggml's 18): the f16 scale d widened to f32, which keeps the words
// aligned, then ggml's 16 bytes unchanged, byte j holding weight j's 4 bits u
// in its low nibble and weight j + 16's in its high one. Weight d·(u − 8),
// exactly the value dequantizeMatrix gives.
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3 (a block holds 8 such quads, so they never straddle two).
fn weight4At(k: u32) -> vec4<f32> {
  let at = k / 8u * 5u;
  let quad = k % 8u;
  // Quads 0–3 are the low nibbles of words 0–3, quads 4–7 their high ones.
  let word = weight[at + 1u + quad % 4u];
  let shift = vec4<u32>(0u, 8u, 16u, 24u) + quad / 4u * 4u;
  let u = (vec4<u32>(word) >> shift) & vec4<u32>(15u);
  return bitcast<f32>(weight[at]) * (vec4<f32>(u) - 8.0);
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
