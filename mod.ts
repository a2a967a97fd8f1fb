/**
 * Mamba language models (selective state space models, Gu & Dao,
 * arXiv 2312.00752) in Deno: load an HF-format checkpoint, run it, stream text.
 *
 * @example Generate text with the bundled tiny-shakespeare model
 * ```ts
 * import { loadModel } from "./mod.ts";
 *
 * const model = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url), {
 *   backend: "js",
 * });
 * for await (const event of model.generate("ROMEO:", { maxNewTokens: 16, temperature: 0 })) {
 *   await Deno.stdout.write(new TextEncoder().encode(event.text));
 * }
 * ```
 *
 * @example Keep a conversation's state and resume it later
 * ```ts
 * import { loadModel } from "./mod.ts";
 *
 * const model = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url));
 * const session = model.session();
 * const logits = await session.prefill(model.tokenizer.encode("JULIET:"));
 * const snapshot = await session.snapshot();
 * const resumed = model.session(snapshot);
 * await resumed.step(logits.indexOf(Math.max(...logits)));
 * ```
 *
 * @module
 */

export { loadModel, Mamba } from "./src/load.ts";
export type { BackendName, LoadOptions, LoadProgress } from "./src/load.ts";
export type { BackendOptions } from "./src/backends/registry.ts";
export type { ScanPrecision } from "./src/backends/webgpu.ts";
export type { MambaConfig } from "./src/config.ts";
export { MambaModel } from "./src/model.ts";
export type { DecodedChunk, DevicePenalty, LogitsFor, MambaState } from "./src/model.ts";
export type {
  Backend,
  ConvArgs,
  ConvProjection,
  ConvStep,
  DeltaProjection,
  Recording,
  RowNorm,
  ScanArgs,
  TopKSampling,
} from "./src/backend.ts";
export { clearBackendCache, formatBackendReport } from "./src/dispatch.ts";
export type { BackendCache, BackendReport, CandidateReport } from "./src/dispatch.ts";
export type { SourceOptions } from "./src/source.ts";
export { Session, SnapshotError } from "./src/session.ts";
export type { DecodeOptions } from "./src/session.ts";
export { StepBatcher } from "./src/batcher.ts";
export type { StepBatcherOptions } from "./src/batcher.ts";
export { Generation } from "./src/generate.ts";
export type {
  FinishReason,
  GenerateOptions,
  GenerationEvent,
  GenerationStats,
} from "./src/generate.ts";
export { MAX_DEVICE_PENALTY_WINDOW, MAX_DEVICE_TOP_K } from "./src/backend.ts";
export { Sampler } from "./src/sampler.ts";
export type { SamplingOptions } from "./src/sampler.ts";
export { MambaTokenizer, StreamingDecoder } from "./src/tokenizer.ts";
export { selectiveScan } from "./src/scan.ts";
export type { SelectiveScanArgs, SelectiveScanOptions, SelectiveScanResult } from "./src/scan.ts";
export { ModelFileError } from "./src/errors.ts";
