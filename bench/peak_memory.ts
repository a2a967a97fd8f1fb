/**
 * Peak resident memory while loading a model and running it (Linux: reads
 * `VmHWM` and `VmRSS` from /proc/self/status):
 *
 * ```sh
 * deno run -A bench/peak_memory.ts <model dir> [wasm|js|webgpu]
 * ```
 *
 * Loads the model, then runs a 512-token prefill (16 on js) and 16 decode steps.
 *
 * @module
 */

import { loadModel } from "../mod.ts";
import type { BackendName } from "../src/backends/registry.ts";
import { promptIds } from "./make_random_model.ts";

function memory(): string {
  const status = Deno.readTextFileSync("/proc/self/status");
  const mb = (key: string) => Number(status.match(new RegExp(`${key}:\\s+(\\d+)`))?.[1]) / 1024;
  return `peak ${mb("VmHWM").toFixed(0)} MB, now ${mb("VmRSS").toFixed(0)} MB`;
}

const [dir, backendName = "wasm"] = Deno.args;
if (!dir) throw new Error("Usage: deno run -A bench/peak_memory.ts <model dir> [backend]");
const backend = backendName as BackendName;
const start = performance.now();
const model = await loadModel(dir, { backend });
const seconds = ((performance.now() - start) / 1000).toFixed(1);
console.log(`${model.backend}: loaded in ${seconds} s: ${memory()}`);
const session = model.session();
const promptLength = backend === "js" ? 16 : 512;
await session.prefill(
  promptIds(promptLength, model.vocabSize),
);
for (let i = 0; i < 16; i++) await session.step(100 + i);
console.log(`${model.backend}: after prefill ${promptLength} + 16 steps: ${memory()}`);
model.model.backend.dispose?.();
