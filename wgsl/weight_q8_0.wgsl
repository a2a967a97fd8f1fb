// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them after blocks.wgsl: ggml's Q8_0 blocks
// of 32 weights as WebGpuBackend.uploadQuantizedMatrix repacks them, 9 u32s a
// block (36 bytes against ggml's 34): the f16 scale d widened to f32, which
// keeps the words aligned, then the 32 int8 values q in order, four to a
// word, lowest byte first. Weight d·q.
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  let at = q8_0Words(k);
  return q8_0Quad(weight[at.x], weight[at.y]);
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
