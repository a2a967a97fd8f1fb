/**
 * The wasm backend's `linear` on lm_head's shape (768 → 50280) with Q8_0,
 * Q4_0 and Q4_K weights against F32 weights (Q8_0's dequantized), alternating,
 * best of 15 per kernel, for 1, 4 and 16 rows of activations, on the
 * kernels' relaxed-SIMD build (default where it validates) or plain one:
 *
 * ```sh
 * deno run -A bench/quant_gemv.ts [threads] [relaxed|plain]
 * ```
 *
 * @module
 */

import { WasmBackend, type WasmSimd } from "../src/backends/wasm.ts";
import { GGML } from "../src/gguf.ts";
import { quantize } from "../src/gguf_write.ts";
import { dequantizeMatrix, quantizedMatrix } from "../src/quant.ts";
import { xorshiftUniforms } from "./make_random_model.ts";

const threads = Number(Deno.args[0] ?? 1);
using backend = await WasmBackend.create({ threads, simd: Deno.args[1] as WasmSimd | undefined });
const [outDim, inDim] = [50280, 768];
const rand = xorshiftUniforms(1);
const values = rand(outDim * inDim);
const q8 = quantizedMatrix("q8_0", outDim, inDim, quantize(GGML.Q8_0, values), "lm_head");
const q4 = quantizedMatrix("q4_0", outDim, inDim, quantize(GGML.Q4_0, values), "lm_head");
const q4k = quantizedMatrix("q4_k", outDim, inDim, quantize(GGML.Q4_K, values), "lm_head");
const kernels = {
  q8_0: backend.uploadQuantizedMatrix(q8),
  q4_0: backend.uploadQuantizedMatrix(q4),
  q4_k: backend.uploadQuantizedMatrix(q4k),
  f32: backend.upload(dequantizeMatrix(q8)),
};
const x = backend.upload(rand(16 * inDim));
const out = backend.zeros(16 * outDim);
for (const rows of [1, 4, 16]) {
  const best = { q8_0: Infinity, q4_0: Infinity, q4_k: Infinity, f32: Infinity };
  for (let rep = 0; rep < 15; rep++) {
    for (const [name, weight] of Object.entries(kernels) as [keyof typeof best, typeof x][]) {
      const start = performance.now();
      backend.linear({ out, x, weight, rows, inDim, outDim });
      best[name] = Math.min(best[name], performance.now() - start);
    }
  }
  const rate = (ms: number) => (rows * outDim * inDim / ms / 1e6).toFixed(2);
  console.log(
    `${backend.simd}, ${threads} thread(s), ${rows} row(s), G weights·rows/s: Q8_0 ${
      rate(best.q8_0)
    }, Q4_0 ${rate(best.q4_0)}, Q4_K ${rate(best.q4_k)}, F32 ${rate(best.f32)}`,
  );
}
