/**
 * Mamba language models (selective state space models, Gu & Dao,
 * arXiv 2312.00752) in Deno: load an HF-format checkpoint, run it, stream text.
 *
 * @example Generate text with the bundled tiny-shakespeare model
 * ```ts
 * import { loadModel } from "./mod.ts";
 * import { assertEquals } from "@std/assert";
 *
 * await using model = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url), {
 *   backend: "js",
 * });
 * let text = "";
 * for await (const event of model.generate("ROMEO:", { maxNewTokens: 12, temperature: 0 })) {
 *   text += event.text;
 * }
 * // Greedy decoding: the reference implementation's text.
 * assertEquals(text, "\nIf I were Richard that I would make my noble good");
 * ```
 *
 * @example Keep a conversation's state and resume it later
 * ```ts
 * import { loadModel } from "./mod.ts";
 * import { assertEquals } from "@std/assert";
 *
 * await using model = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url), {
 *   backend: "js",
 * });
 * const session = model.session();
 * const logits = await session.prefill(model.tokenizer.encode("JULIET:"));
 * const next = logits.indexOf(Math.max(...logits));
 * const resumed = model.session(await session.snapshot());
 * // The resumed session continues exactly where the original stood.
 * assertEquals(await resumed.step(next), await session.step(next));
 * ```
 *
 * @example Branch on the typed errors
 * ```ts
 * import { loadModel, ModelFileError } from "./mod.ts";
 * import { assertInstanceOf, assertRejects } from "@std/assert";
 *
 * const error = await assertRejects(() => loadModel("./no/such/model"));
 * assertInstanceOf(error, ModelFileError);
 * ```
 *
 * @module
 */

export { loadModel, Mamba } from "./src/load.ts";
export type { BackendName, LoadOptions, LoadProgress } from "./src/load.ts";
export type { BackendOptions } from "./src/backends/registry.ts";
export type { ScanPrecision } from "./src/backends/webgpu/mod.ts";
export type { WasmSimd } from "./src/backends/wasm.ts";
export type { MambaConfig } from "./src/config.ts";
export type { SourceOptions } from "./src/source.ts";
export { formatBackendReport } from "./src/dispatch.ts";
export type { BackendCache, BackendReport, CandidateReport, MeasuredRuns } from "./src/dispatch.ts";
export { Session } from "./src/session.ts";
export type { Verdict } from "./src/engine.ts";

export type { DecodeOptions, SessionDecodeOptions } from "./src/session.ts";
export { Generation } from "./src/generate.ts";
export type {
  FinishReason,
  GenerateOptions,
  GenerationEvent,
  GenerationStats,
} from "./src/generate.ts";
export { Sampler } from "./src/sampler.ts";
export type { SamplingOptions } from "./src/sampler.ts";
export { MambaTokenizer, StreamingDecoder } from "./src/tokenizer.ts";
export { selectiveScan } from "./src/scan.ts";
export type { SelectiveScanArgs, SelectiveScanOptions, SelectiveScanResult } from "./src/scan.ts";
export { BackendUnavailableError, ModelFileError, SnapshotError } from "./src/errors.ts";
