/**
 * Public `selectiveScan` on wasm against js at (B, D, L) = (1, 1536, 2048),
 * N = 16, random inputs in mamba_ssm's layouts: best of three calls after a
 * warm-up. Run: `deno run -A bench/scan_api.ts`.
 *
 * @module
 */
import { selectiveScan } from "../mod.ts";
const [batch, dim, len, dState] = [1, 1536, 2048, 16];
const rand = (n: number, lo: number, hi: number) =>
  Float32Array.from({ length: n }, () => lo + Math.random() * (hi - lo));
const args = {
  batch,
  dim,
  len,
  dState,
  u: rand(batch * dim * len, -1, 1),
  delta: rand(batch * dim * len, 0, 0.5),
  z: rand(batch * dim * len, -1, 1),
  A: rand(dim * dState, -2, -0.1),
  B: rand(batch * dState * len, -1, 1),
  C: rand(batch * dState * len, -1, 1),
  D: rand(dim, -1, 1),
  deltaBias: rand(dim, -0.5, 0.5),
  deltaSoftplus: true,
};
const best: Record<string, number> = {};
for (const backend of ["js", "wasm"] as const) {
  await selectiveScan(args, { backend }); // warm-up (and the backend's creation)
  for (let rep = 0; rep < 3; rep++) {
    const t0 = performance.now();
    await selectiveScan(args, { backend });
    const ms = performance.now() - t0;
    best[backend] = Math.min(best[backend] ?? Infinity, ms);
  }
  console.log(
    backend,
    `${best[backend].toFixed(0)} ms`,
    `${(batch * dim * len / best[backend] / 1e3).toFixed(1)} M elements/s`,
  );
}
console.log(`wasm / js: ${(best.js / best.wasm).toFixed(2)}x`);
