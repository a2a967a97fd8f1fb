// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: ggml's Q8_0 blocks of 32 weights as
// WebGpuBackend.uploadQuantizedMatrix repacks them, 9 u32s a block (36 bytes
// against ggml's 34): the f16 scale d widened to f32, which keeps the words
// aligned, then the 32 int8 values q in order, four to a word, lowest byte
// first. Weight d·q, exactly the value dequantizeMatrix gives.
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3 (a block holds 8 such quads, so they never straddle two).
fn weight4At(k: u32) -> vec4<f32> {
  let at = k / 8u * 9u;
  let word = weight[at + 1u + k % 8u];
  // Each byte shifted to the top, then back arithmetically: its sign extended.
  let q = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
  return bitcast<f32>(weight[at]) * vec4<f32>(q);
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
