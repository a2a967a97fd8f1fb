// Parameters, bias and output of the linear kernels (gemv, gemv4, matmul),
// prepended to them: out [rows, outDim] = x [rows, inDim] · weightᵀ + bias.
// A weight matrix split by rows over several buffers (too large for one
// binding) runs once per part: outDim is then the part's rows, written to
// columns colOffset.. of output rows of outStride floats.
struct Params {
  rows: u32,
  inDim: u32,
  outDim: u32,
  hasBias: u32,
  outStride: u32,
  colOffset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
