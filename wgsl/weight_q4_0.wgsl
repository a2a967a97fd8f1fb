// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them after blocks.wgsl: ggml's Q4_0 blocks
// of 32 weights as WebGpuBackend.uploadQuantizedMatrix repacks them, 5 u32s a
// block (20 bytes against ggml's 18): the f16 scale d widened to f32, which
// keeps the words aligned, then ggml's 16 bytes unchanged, byte j holding
// weight j's 4 bits u in its low nibble and weight j + 16's in its high one.
// Weight d·(u − 8).
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  let at = q4_0Words(k);
  return q4_0Quad(k, weight[at.x], weight[at.y]);
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
