// Where matmul.wgsl's main puts its sums when one workgroup covers all of K:
// straight to the outputs, bias added (linear_io.wgsl's storeOut, via put).
fn putSum(part: u32, r: u32, c: u32, v: vec4<f32>) {
  put(r, c, v);
}
