/**
 * The f32 multiply-add ceiling of WebAssembly SIMD on this machine: what the
 * wasm backend's matmul can reach at best, whatever its blocking. Twelve
 * independent chains of f32x4 multiply-adds fed from the L1 cache, on 1 to
 * `--threads` workers at once; each worker's GFLOP/s (one multiply-add is two
 * flops per lane) is the best of `--reps` calls after a warm-up.
 *
 * ```sh
 * deno run -A bench/cpu_peak.ts --threads=2 --reps=5
 * ```
 *
 * Two builds of the same loop: relaxed SIMD's `f32x4.relaxed_madd` (one
 * fused multiply-add where the CPU has FMA, as the wasm backend's kernels
 * use) and plain SIMD's multiply, then add. docs/performance.md has the
 * figures and what they bound.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { compileAssemblyScript } from "../asm/build.ts";

const flags = parseArgs(Deno.args, {
  string: ["threads", "reps", "iterations"],
  default: { threads: "2", reps: "5", iterations: "20000000" },
});
const maxThreads = Number(flags.threads);
const reps = Number(flags.reps);
const iterations = Number(flags.iterations);
const CHAINS = 12;
for (const [name, value] of Object.entries({ threads: maxThreads, reps, iterations })) {
  if (!(Number.isInteger(value) && value > 0)) {
    throw new Error(`--${name} must be a positive integer, got ${Deno.args.join(" ")}`);
  }
}

/**
 * The AssemblyScript source: `peak(n)` runs n steps of the f32 matmul's inner
 * step (asm/kernels/linear.ts) with nothing to wait for: two weight vectors
 * and six broadcast inputs, loaded from the same 96 bytes each step, into
 * CHAINS accumulators. (With the factors held in registers instead, V8's code
 * ran at half this rate on the development VM.)
 */
function source(relaxed: boolean): string {
  const madd = (b: string, w: string, a: string) =>
    relaxed ? `f32x4.relaxed_madd(${b}, ${w}, ${a})` : `f32x4.add(f32x4.mul(${b}, ${w}), ${a})`;
  const chains = Array.from({ length: CHAINS }, (_, i) => `a${i}`);
  const step = Array.from({ length: CHAINS / 2 }, (_, i) =>
    `b = v128.load32_splat(p, ${4 * i});
    a${2 * i} = ${madd("b", "w0", `a${2 * i}`)};
    a${2 * i + 1} = ${madd("b", "w1", `a${2 * i + 1}`)};`);
  return `const DATA = memory.data(96, 64);
export function peak(n: i32, seed: f32): f32 {
  const p = DATA;
  for (let i = 0; i < 24; i++) store<f32>(p + (<usize>i << 2), seed * <f32>i);
  ${chains.map((a, i) => `let ${a} = f32x4.splat(<f32>${i + 1});`).join("\n  ")}
  for (let i = 0; i < n; i++) {
    const w0 = v128.load(p, 64);
    const w1 = v128.load(p, 80);
    let b: v128;
    ${step.join("\n    ")}
  }
  let s = a0;
  ${chains.slice(1).map((a) => `s = f32x4.add(s, ${a});`).join("\n  ")}
  return f32x4.extract_lane(s, 0);
}
`;
}

function compile(relaxed: boolean): Promise<Uint8Array> {
  const options = ["-O3", "--runtime", "stub", "--enable", "simd"];
  if (relaxed) options.push("--enable", "relaxed-simd");
  return compileAssemblyScript(
    "peak.ts",
    options,
    (name) => name === "peak.ts" ? source(relaxed) : null,
  );
}

/** Each worker instantiates the module, then runs `peak` on request and answers its milliseconds. */
const WORKER = `
self.onmessage = async ({ data }) => {
  const { instance } = await WebAssembly.instantiate(data, { env: { abort() {} } });
  self.onmessage = ({ data: n }) => {
    const start = performance.now();
    instance.exports.peak(n, 0.001);
    self.postMessage(performance.now() - start);
  };
  self.postMessage("ready");
};
`;

async function measure(wasm: Uint8Array, threads: number): Promise<number[]> {
  const url = `data:text/javascript,${encodeURIComponent(WORKER)}`;
  const workers = Array.from({ length: threads }, () => new Worker(url, { type: "module" }));
  const answer = (worker: Worker, message: unknown) =>
    new Promise<unknown>((resolve) => {
      worker.onmessage = (event) => resolve(event.data);
      worker.postMessage(message);
    });
  try {
    await Promise.all(workers.map((worker) => answer(worker, wasm)));
    const best = workers.map(() => Infinity);
    for (let rep = 0; rep <= reps; rep++) {
      const ms = await Promise.all(workers.map((worker) => answer(worker, iterations)));
      // The first round is the warm-up: V8 compiles the loop's fast tier meanwhile.
      if (rep > 0) ms.forEach((m, i) => best[i] = Math.min(best[i], m as number));
    }
    return best.map((ms) => iterations * CHAINS * 8 / ms / 1e6);
  } finally {
    workers.forEach((worker) => worker.terminate());
  }
}

for (const relaxed of [true, false]) {
  const wasm = await compile(relaxed);
  const build = relaxed ? "relaxed_madd" : "mul + add";
  for (let threads = 1; threads <= maxThreads; threads++) {
    const each = await measure(wasm, threads);
    const total = each.reduce((a, b) => a + b, 0);
    console.log(
      `${build}, ${threads} thread(s): ${each.map((g) => g.toFixed(1)).join(" + ")} = ${
        total.toFixed(1)
      } GFLOP/s`,
    );
  }
}
