// AssemblyScript kernels of the "wasm" backend (src/backends/wasm.ts), built
// with SIMD by `deno task build` into src/generated/kernels_wasm.ts.
//
// Every pointer is a byte offset into the (imported, possibly shared) memory;
// every buffer holds f32 in the token-major layouts of src/backend.ts. A null
// optional buffer is passed as pointer 0 (the allocator never hands out 0).
// Kernels that split across threads take a range [from, to) of output columns
// or channels, so that each thread writes a disjoint part of the output.

//
// The build compiles this module, which only names what src/backends/wasm.ts
// calls. The kernels live in asm/kernels/, a file per family (math, scan,
// linear, q8_0, q4_0, q4_k, blocks, half, norm_conv, mamba2), and jobs.ts
// there splits them between threads. deno fmt and lint leave these files
// alone: fmt would drop the @inline decorators, which TypeScript lacks.

export { setConstants, mathTest } from "./kernels/math";
export { setConstants64, mathTest64, scanScratchBytes, scan, setPow2Constants, scanStep } from "./kernels/scan";
export { panelBytes, linear } from "./kernels/linear";
export { blocksScratchBytes, linearBlocks } from "./kernels/blocks";
export { widenHalfRow, halfScratchBytes, linearHalf } from "./kernels/half";
export { rmsNorm, addInPlace, convScratchBytes, causalConv, convStep, convStepScratchBytes } from "./kernels/norm_conv";
export { ssdScratchBytes, ssd, ssdStep, gatedRmsNorm } from "./kernels/mamba2";
export { threadStride, runJob, heapBase } from "./kernels/jobs";
