// A thread's 8 × 8 block of a tiled product (matmul.wgsl's main, ssd.wgsl's
// chunk_state and output), prepended to those shaders. The block lives in 16
// module-scope vec4s, which start at 0 in each invocation: a private array
// indexed in a loop would land in slow local memory. Row i (0..7) of the block
// is acc<i>a (its first 4 columns) and acc<i>b (its last 4).
var<private> acc0a: vec4<f32>;
var<private> acc0b: vec4<f32>;
var<private> acc1a: vec4<f32>;
var<private> acc1b: vec4<f32>;
var<private> acc2a: vec4<f32>;
var<private> acc2b: vec4<f32>;
var<private> acc3a: vec4<f32>;
var<private> acc3b: vec4<f32>;
var<private> acc4a: vec4<f32>;
var<private> acc4b: vec4<f32>;
var<private> acc5a: vec4<f32>;
var<private> acc5b: vec4<f32>;
var<private> acc6a: vec4<f32>;
var<private> acc6b: vec4<f32>;
var<private> acc7a: vec4<f32>;
var<private> acc7b: vec4<f32>;

// One step of the block: the outer product of its rows' values (a for rows
// 0..3, a2 for rows 4..7) and its columns' (b for columns 0..3, b2 for 4..7).
fn outer8x8(a: vec4<f32>, a2: vec4<f32>, b: vec4<f32>, b2: vec4<f32>) {
  acc0a = fma(vec4<f32>(a.x), b, acc0a);
  acc0b = fma(vec4<f32>(a.x), b2, acc0b);
  acc1a = fma(vec4<f32>(a.y), b, acc1a);
  acc1b = fma(vec4<f32>(a.y), b2, acc1b);
  acc2a = fma(vec4<f32>(a.z), b, acc2a);
  acc2b = fma(vec4<f32>(a.z), b2, acc2b);
  acc3a = fma(vec4<f32>(a.w), b, acc3a);
  acc3b = fma(vec4<f32>(a.w), b2, acc3b);
  acc4a = fma(vec4<f32>(a2.x), b, acc4a);
  acc4b = fma(vec4<f32>(a2.x), b2, acc4b);
  acc5a = fma(vec4<f32>(a2.y), b, acc5a);
  acc5b = fma(vec4<f32>(a2.y), b2, acc5b);
  acc6a = fma(vec4<f32>(a2.z), b, acc6a);
  acc6b = fma(vec4<f32>(a2.z), b2, acc6b);
  acc7a = fma(vec4<f32>(a2.w), b, acc7a);
  acc7b = fma(vec4<f32>(a2.w), b2, acc7b);
}
