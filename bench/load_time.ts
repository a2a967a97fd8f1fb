/**
 * Time and peak resident memory of one `loadModel`, in a fresh process per
 * figure (Linux: `VmHWM` from /proc/self/status); prints one JSON line:
 *
 * ```sh
 * deno run -A bench/load_time.ts <model dir> [js|wasm|webgpu]
 * ```
 *
 * Run it several times alternating with another build to compare loads.
 *
 * @module
 */

import { loadModel } from "../mod.ts";

const [dir, backend = "js"] = Deno.args;
if (!dir) throw new Error("Usage: deno run -A bench/load_time.ts <model dir> [backend]");
const start = performance.now();
const model = await loadModel(dir, { backend: backend as "js" | "wasm" | "webgpu" });
const ms = performance.now() - start;
const status = Deno.readTextFileSync("/proc/self/status");
const peakMB = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1]) / 1024;
console.log(
  JSON.stringify({ backend: model.backend, ms: Math.round(ms), peakMB: Math.round(peakMB) }),
);
model.dispose();
