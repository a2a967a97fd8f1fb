/**
 * The library's internals for those who build on them: the reference model
 * and its state pool, the backend interface with its argument types, the
 * decode engine, the sampler's kernels and backend selection's cache. These
 * change between minor versions; the stable surface is `mod.ts`.
 *
 * @experimental
 * @module
 */

export { loadModel, Mamba } from "./src/load.ts";
export type { BackendName, LoadOptions, LoadProgress } from "./src/load.ts";
export type { BackendOptions } from "./src/backends/registry.ts";
export type { WasmSimd } from "./src/backends/wasm.ts";
export type { ScanPrecision } from "./src/backends/webgpu/mod.ts";
export type { Mamba2Dims, MambaConfig } from "./src/config.ts";
export type { Mamba2Buffers } from "./src/mamba2.ts";
export { MambaModel } from "./src/model.ts";
export type { BlockBuffers, Scratch } from "./src/model.ts";
export { StatePool } from "./src/pool.ts";
export type { PoolCopy, SlotContents } from "./src/pool.ts";
export type {
  AddArgs,
  Backend,
  ChooseArgs,
  ConvArgs,
  CopyArgs,
  CopyRowsArgs,
  EmbedArgs,
  GatedNormArgs,
  LinearArgs,
  LinearSplitArgs,
  OptionalOp,
  Recording,
  RmsNormArgs,
  RowIndex,
  SamplingFeatures,
  SamplingSettings,
  ScanArgs,
  SsdArgs,
} from "./src/backend.ts";
export { SAMPLING_SETTINGS, samplingFeatures, samplingSettings } from "./src/backend.ts";
export { clearBackendCache, formatBackendReport } from "./src/dispatch.ts";
export type { BackendCache, BackendReport, CandidateReport, MeasuredRuns } from "./src/dispatch.ts";
export type { SourceOptions } from "./src/source.ts";
export { Session } from "./src/session.ts";
export type { DecodeOptions, SessionDecodeOptions } from "./src/session.ts";
export { DecodeEngine, engineFor } from "./src/engine.ts";
export type { DecodeJob, DecodeResult, EngineOptions, Verdict } from "./src/engine.ts";
export { Generation } from "./src/generate.ts";
export type {
  FinishReason,
  GenerateOptions,
  GenerationEvent,
  GenerationStats,
} from "./src/generate.ts";
export { PickScratch, pickToken, Sampler } from "./src/sampler.ts";
export type { SamplingOptions } from "./src/sampler.ts";
export { MambaTokenizer, StreamingDecoder } from "./src/tokenizer.ts";
export { selectiveScan } from "./src/scan.ts";
export type { SelectiveScanArgs, SelectiveScanOptions, SelectiveScanResult } from "./src/scan.ts";
export { BackendUnavailableError, ModelFileError, SnapshotError } from "./src/errors.ts";
export { GGML, GGML_TYPES, GgufFile } from "./src/gguf.ts";
export type { GgmlType, GgufTensorInfo, GgufValue } from "./src/gguf.ts";
export { TorchFile } from "./src/torch.ts";
export type { TorchTensor } from "./src/torch.ts";
export type { TensorFile } from "./src/weights.ts";
export type { BlockType, HalfFormat, HalfMatrix, Halves, QuantizedMatrix } from "./src/quant.ts";
export { quantizeModel } from "./src/quantize.ts";
export type { QuantizedModel, QuantizeType } from "./src/quantize.ts";
