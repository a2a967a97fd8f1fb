/**
 * The wasm backend's `linear` on lm_head's shape (768 → 50280) with Q8_0
 * weights against the same weights dequantized to F32, alternating, best of
 * 15 per kernel, for 1, 4 and 16 rows of activations:
 *
 * ```sh
 * deno run -A bench/q8_gemv.ts [threads]
 * ```
 *
 * @module
 */

import { WasmBackend } from "../src/backends/wasm.ts";
import { GGML } from "../src/gguf.ts";
import { quantize } from "../src/gguf_write.ts";
import { dequantizeMatrix, q8_0Matrix } from "../src/quant.ts";
import { xorshiftUniforms } from "./make_random_model.ts";

const threads = Number(Deno.args[0] ?? 1);
using backend = await WasmBackend.create({ threads });
const [outDim, inDim] = [50280, 768];
const rand = xorshiftUniforms(1);
const matrix = q8_0Matrix(outDim, inDim, quantize(GGML.Q8_0, rand(outDim * inDim)), "lm_head");
const kernels = {
  q8_0: backend.uploadQuantizedMatrix(matrix),
  f32: backend.upload(dequantizeMatrix(matrix)),
};
const x = backend.upload(rand(16 * inDim));
const out = backend.zeros(16 * outDim);
for (const rows of [1, 4, 16]) {
  const best = { q8_0: Infinity, f32: Infinity };
  for (let rep = 0; rep < 15; rep++) {
    for (const [name, weight] of Object.entries(kernels) as [keyof typeof best, typeof x][]) {
      const start = performance.now();
      backend.linear(out, x, weight, null, rows, inDim, outDim);
      best[name] = Math.min(best[name], performance.now() - start);
    }
  }
  const rate = (ms: number) => (rows * outDim * inDim / ms / 1e6).toFixed(2);
  console.log(
    `${threads} thread(s), ${rows} row(s): Q8_0 ${best.q8_0.toFixed(2)} ms (${
      rate(best.q8_0)
    } G weights·rows/s), F32 ${best.f32.toFixed(2)} ms (${rate(best.f32)})`,
  );
}
