// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: ggml's Q4_K super-blocks of 256
// weights (8 sub-blocks of 32) as WebGpuBackend.uploadQuantizedMatrix repacks
// them, 38 u32s each (152 bytes against ggml's 144): d and dmin widened to
// f32, the 8 sub-blocks' 6-bit scales sc a byte each (2 words), then their
// mins m likewise (2 words), which spares the shader ggml's 12-byte bit
// packing, then ggml's 128 bytes of 4-bit values q unchanged (sub-blocks 2i
// and 2i + 1 in the low and high nibbles of bytes 32i to 32i + 31). Weight
// (d·sc)·q − dmin·m: d·sc, dmin·m and the product with q are exact in f32, so
// one rounding at the subtraction gives exactly dequantizeMatrix's value.
@group(0) @binding(2) var<storage, read> weight: array<u32>;

// Elements 4k to 4k+3 (a sub-block holds 8 such quads, so they never straddle two).
fn weight4At(k: u32) -> vec4<f32> {
  let at = k / 64u * 38u;
  let sub = k % 64u / 8u;
  let byteShift = sub % 4u * 8u;
  let sc = (weight[at + 2u + sub / 4u] >> byteShift) & 255u;
  let m = (weight[at + 4u + sub / 4u] >> byteShift) & 255u;
  let dScale = bitcast<f32>(weight[at]) * f32(sc);
  let dMin = bitcast<f32>(weight[at + 1u]) * f32(m);
  let word = weight[at + 6u + sub / 2u * 8u + k % 8u];
  let shift = vec4<u32>(0u, 8u, 16u, 24u) + sub % 2u * 4u;
  let q = (vec4<u32>(word) >> shift) & vec4<u32>(15u);
  return dScale * vec4<f32>(q) - dMin;
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight4At(i / 4u)[i % 4u];
}
