// Parameters, bias and outputs of the linear kernels (gemv, gemv4, matmul),
// prepended to them: out [rows, outDim] = x [rows, inDim] · weightᵀ + bias.
//
// The columns of the full product (outStride of them) may go to up to three
// buffers: [0, split1) to out, [split1, split2) to out2, the rest to out3,
// each a matrix of its own width (in_proj's x and z, x_proj's dt, B and C).
// With one output, split1 = split2 = outStride. `accumulate` adds to out
// instead of overwriting it (the residual connection).
//
// A weight matrix split by rows over several buffers (too large for one
// binding) runs once per part: outDim is then the part's rows, which are the
// columns colOffset.. of the full product.
struct Params {
  rows: u32,
  inDim: u32,
  outDim: u32,
  hasBias: u32,
  outStride: u32,
  colOffset: u32,
  split1: u32,
  split2: u32,
  accumulate: u32,
  hasNorm: u32, // gemv4 only: normalise x's rows first (see gemv4.wgsl)
  convKernel: u32, // gemv4 only: taps of the conv step of out's columns, or 0
  convHasBias: u32, // gemv4 only
  projWidth: u32, // gemv4 only: columns of the projection of the conv step's outputs, or 0
  // gemv4 only: its weight's format: f32 (0), packed f16 (1) or bf16 (2), Q8_0 (3), Q4_0 (4) or
  // Q4_K (5) blocks (blocks.wgsl)
  projFormat: u32,
  convSlots: u32, // gemv4 only: the conv states are rows of a pool, named by convSlots
  normEps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;
@group(0) @binding(6) var<storage, read_write> out3: array<f32>;
// Column c of this dispatch's product with the bias added.
fn withBias(c: u32, sum: f32) -> f32 {
  if (p.hasBias != 0u) {
    return sum + bias[p.colOffset + c];
  }
  return sum;
}

// Writes v to row r, column c of this dispatch (c < outDim), in the output
// that holds the column.
fn storeValue(r: u32, c: u32, v: f32) {
  let g = p.colOffset + c;
  if (g < p.split1) {
    let i = r * p.split1 + g;
    if (p.accumulate != 0u) {
      out[i] += v;
    } else {
      out[i] = v;
    }
  } else if (g < p.split2) {
    out2[r * (p.split2 - p.split1) + g - p.split1] = v;
  } else {
    out3[r * (p.outStride - p.split2) + g - p.split2] = v;
  }
}

// Stores the product at row r, column c of this dispatch: bias added.
fn storeOut(r: u32, c: u32, sum: f32) {
  storeValue(r, c, withBias(c, sum));
}
