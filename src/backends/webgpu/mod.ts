/**
 * The WebGPU backend (see backend.ts) and what its users name: its buffers,
 * options and errors.
 *
 * @module
 */

export {
  describeAdapter,
  WebGpuBackend,
  type WebGpuOptions,
  WebGpuUnavailableError,
} from "./backend.ts";
export { GpuBuffer, type WeightFormat } from "./memory.ts";
export { GpuRecording, type KernelTimes } from "./runtime.ts";
export type { ScanOptions, ScanPrecision } from "./scan.ts";
export type { SsdOptions } from "./ssd.ts";
