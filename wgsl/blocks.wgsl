// Decoding of the quantized blocks that WebGpuBackend.uploadQuantizedMatrix
// repacks (its BLOCK_WORDS; the layouts are described in weight_q8_0.wgsl,
// weight_q4_0.wgsl and weight_q4_k.wgsl), in two steps, as WGSL functions
// cannot take a storage array: where quad k of a matrix (its elements 4k to
// 4k+3, never across blocks) finds its words, and the quad from those words.
// The weight preludes decode their matrix with it, and a decode step's fused
// paths a second matrix of any format (x_proj in gemv4_shares.wgsl, dt_proj
// in scan.wgsl). Each weight is exactly the value dequantizeMatrix gives.

// Q8_0 quad k: the words of its block's scale and of its four values.
fn q8_0Words(k: u32) -> vec2<u32> {
  let at = k / 8u * 9u;
  return vec2<u32>(at, at + 1u + k % 8u);
}

// d·q for the four int8 values q of `values`, lowest byte first.
fn q8_0Quad(scale: u32, values: u32) -> vec4<f32> {
  // Each byte shifted to the top, then back arithmetically: its sign extended.
  let q = bitcast<vec4<i32>>(vec4<u32>(values) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
  return bitcast<f32>(scale) * vec4<f32>(q);
}

// Q4_0 quad k: the words of its block's scale and of its four values.
fn q4_0Words(k: u32) -> vec2<u32> {
  let at = k / 8u * 5u;
  return vec2<u32>(at, at + 1u + k % 4u);
}

// d·(u − 8) for quad k's four 4-bit values u in `values`: quads 0–3 of a block
// are the low nibbles of its value words, quads 4–7 their high ones.
fn q4_0Quad(k: u32, scale: u32, values: u32) -> vec4<f32> {
  let shift = vec4<u32>(0u, 8u, 16u, 24u) + k % 8u / 4u * 4u;
  let u = (vec4<u32>(values) >> shift) & vec4<u32>(15u);
  return bitcast<f32>(scale) * (vec4<f32>(u) - 8.0);
}

// Q4_K quad k: the words of its super-block's d (dmin is the next), of its
// sub-block's scale and min (a byte each) and of its four values.
fn q4_kWords(k: u32) -> vec4<u32> {
  let at = k / 64u * 38u;
  let sub = k % 64u / 8u;
  return vec4<u32>(at, at + 2u + sub / 4u, at + 4u + sub / 4u, at + 6u + sub / 2u * 8u + k % 8u);
}

// (d·sc)·q − dmin·m for quad k's four 4-bit values q in `values`: sub-blocks
// 2i and 2i + 1 are the low and high nibbles of the same 32 bytes. d·sc, dmin·m
// and the product with q are exact in f32, so the one rounding, at the
// subtraction, is dequantizeMatrix's.
fn q4_kQuad(k: u32, d: u32, dmin: u32, scales: u32, mins: u32, values: u32) -> vec4<f32> {
  let sub = k % 64u / 8u;
  let byteShift = sub % 4u * 8u;
  let dScale = bitcast<f32>(d) * f32((scales >> byteShift) & 255u);
  let dMin = bitcast<f32>(dmin) * f32((mins >> byteShift) & 255u);
  let shift = vec4<u32>(0u, 8u, 16u, 24u) + sub % 2u * 4u;
  let q = (vec4<u32>(values) >> shift) & vec4<u32>(15u);
  return dScale * vec4<f32>(q) - dMin;
}
