/**
 * The wasm backend under Node.js, a JavaScript runtime other than Deno whose
 * V8 may lack relaxed SIMD (Node 20 does, unless run with
 * `--experimental-wasm-relaxed-simd`). node_runtime_test.ts bundles this file
 * and runs it with `node node_runtime.mjs <model dir>`: it builds the model
 * in the directory (config.json, model.safetensors) on the wasm backend with
 * its default build, computes the logits of expected.safetensors'
 * `prompt0_greedy_ids`, and prints one JSON line: whether the runtime
 * validates relaxed SIMD, the build that ran, and the largest difference from
 * `prompt0_logits`.
 *
 * @module
 */

import { readFileSync } from "node:fs";
import { parseConfig } from "../src/config.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { loadWeightsAsStored, TensorStore } from "../src/weights.ts";
import { WasmBackend, wasmRelaxedSimdSupported } from "../src/backends/wasm.ts";
import { MambaModel } from "../src/model.ts";

const dir = (globalThis as { process?: { argv: string[] } }).process?.argv[2];
if (!dir) throw new Error("Usage: node node_runtime.mjs <model dir>");
const read = (name: string) => new Uint8Array(readFileSync(`${dir}/${name}`));
const config = parseConfig(
  JSON.parse(new TextDecoder().decode(read("config.json"))),
  "config.json",
);
const weights = loadWeightsAsStored(
  new TensorStore([SafetensorsFile.parse(read("model.safetensors"), "model.safetensors")]),
  config,
  "config.json",
);
const expected = SafetensorsFile.parse(read("expected.safetensors"), "expected.safetensors");
const backend = await WasmBackend.create({ threads: 1 });
try {
  const model = new MambaModel(backend, config, weights);
  const logits = await model.forward(model.pool.acquire(), expected.int32("prompt0_greedy_ids"));
  const want = expected.float32("prompt0_logits");
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(logits[i] - want[i]));
  console.log(JSON.stringify({ relaxed: wasmRelaxedSimdSupported(), simd: backend.simd, maxDiff }));
} finally {
  backend.dispose();
}
