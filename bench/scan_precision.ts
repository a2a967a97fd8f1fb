/**
 * Which parts of the selective scan can drop to float32 and still meet the
 * float64 scan fixtures (../shared/fixtures/scan) within the backend suite's
 * 1e-4 relative (|a - b| / max(|b|, 1e-3))? A plain-JS scan in float64 with
 * one quantity at a time rounded to float32 (`Math.fround`, i.e. correctly
 * rounded, better than any SIMD kernel's float32 exp), printing the worst
 * error over the four fixtures for each variant:
 *
 * - dt, exp(dt·A) or the state h in float32;
 * - h as an unevaluated pair of float32 (hi + lo, stored after each step);
 * - a float32 state local to a chunk of tokens, s_t = dA_t·s_{t-1} + dt·u·B,
 *   with the chunk's decay product P_t = Π dA in float64 and the state at the
 *   chunk's start h_0 in float64: h_t = P_t·h_0 + s_t.
 *
 * `deno run -A bench/scan_precision.ts`. Results are in docs/performance.md.
 *
 * @module
 */

import { SafetensorsFile } from "../src/safetensors.ts";
import { maxAbsDiff, maxRelDiff, SHARED } from "../tests/helpers.ts";
const f = Math.fround;

/** Which quantities a variant keeps in float32. */
type Variant = { dt32?: boolean; dA32?: boolean; h32?: boolean; hPair?: boolean; chunk?: number };
const VARIANTS: Record<string, Variant> = {
  "f64 (today)": {},
  "dt f32": { dt32: true },
  "exp(dt·A) f32": { dA32: true },
  "h f32": { h32: true },
  "h f32 pair (hi+lo)": { hPair: true },
  "f32 chunk-local state + f64 decay product, chunk 16": { chunk: 16 },
  "f32 chunk-local state + f64 decay product, chunk 64": { chunk: 64 },
};
/** The scan of one fixture file in the variant's arithmetic. */
function scan(file: SafetensorsFile, v: Variant) {
  const [batch, dim, len] = file.info("u").shape;
  const N = file.info("A").shape[1];
  const u = file.float32("u"), delta = file.float32("delta"), A = file.float32("A");
  const B = file.float32("B"), C = file.float32("C");
  const D = file.has("D") ? file.float32("D") : null, z = file.has("z") ? file.float32("z") : null;
  const bias = file.has("delta_bias") ? file.float32("delta_bias") : null;
  const sp = file.metadata.delta_softplus === "true";
  const y = new Float64Array(batch * dim * len), last = new Float64Array(batch * dim * N);
  for (let b = 0; b < batch; b++) {
    for (let d = 0; d < dim; d++) {
      const h = new Float64Array(N), lo = new Float64Array(N);
      const h0 = new Float64Array(N), s = new Float64Array(N), P = new Float64Array(N).fill(1);
      for (let t = 0; t < len; t++) {
        const i = (b * dim + d) * len + t;
        let dt = delta[i] + (bias ? bias[d] : 0);
        if (sp) dt = dt > 20 ? dt : Math.log1p(Math.exp(dt));
        if (v.dt32) dt = f(dt);
        let acc = 0;
        if (v.chunk && t % v.chunk === 0) {
          for (let n = 0; n < N; n++) {
            h0[n] = h0[n] * P[n] + s[n];
            s[n] = 0;
            P[n] = 1;
          }
        }
        for (let n = 0; n < N; n++) {
          const bi = (b * N + n) * len + t;
          const dA = Math.exp(dt * A[d * N + n]);
          const inc = dt * u[i] * B[bi];
          let hn: number;
          if (v.chunk) {
            P[n] *= dA;
            s[n] = f(f(f(dA) * s[n]) + f(inc));
            hn = P[n] * h0[n] + s[n];
          } else if (v.hPair) {
            const full = dA * (h[n] + lo[n]) + inc;
            h[n] = f(full);
            lo[n] = f(full - h[n]);
            hn = h[n] + lo[n];
          } else {
            hn = (v.dA32 ? f(dA) : dA) * h[n] + inc;
            if (v.h32) hn = f(hn);
            h[n] = hn;
          }
          acc += hn * C[bi];
        }
        if (v.chunk && t === len - 1) { for (let n = 0; n < N; n++) h[n] = P[n] * h0[n] + s[n]; }
        if (D) acc += D[d] * u[i];
        if (z) acc *= z[i] / (1 + Math.exp(-z[i]));
        y[i] = acc;
      }
      for (let n = 0; n < N; n++) last[(b * dim + d) * N + n] = v.hPair ? h[n] + lo[n] : h[n];
    }
  }
  return { y, last };
}
for (const [name, v] of Object.entries(VARIANTS)) {
  let worstRel = 0, worstAbs = 0, worstState = 0;
  for (const fx of ["small", "medium", "long", "bare"]) {
    const path = `${SHARED}/fixtures/scan/${fx}.safetensors`;
    const file = SafetensorsFile.parse(await Deno.readFile(path), path);
    const { y, last } = scan(file, v);
    worstRel = Math.max(worstRel, maxRelDiff(y, file.float32("y")));
    worstAbs = Math.max(worstAbs, maxAbsDiff(y, file.float32("y")));
    worstState = Math.max(worstState, maxRelDiff(last, file.float32("last_state")));
  }
  console.log(
    `${name}: y max rel ${worstRel.toExponential(2)}, max abs ${
      worstAbs.toExponential(2)
    }; lastState max rel ${worstState.toExponential(2)}`,
  );
}
