/**
 * {@link loadModel}: reads an HF-format Mamba checkpoint (config.json,
 * model.safetensors or its shards, or pytorch_model.bin or its shards, and
 * tokenizer.json) from a directory, a URL or the hub, or one GGUF file, and
 * returns a ready {@link Mamba}.
 *
 * @module
 */

import type { HalfFormat } from "./quant.ts";
import type { BackendName } from "./backends/registry.ts";
import type { WasmSimd } from "./backends/wasm.ts";
import { type MambaConfig, parseConfig } from "./config.ts";
import { type BackendCache, type BackendReport, checkedBatch, selectBackend } from "./dispatch.ts";
import { generate, type GenerateOptions, type Generation } from "./generate.ts";
import { engineFor } from "./engine.ts";
import { checkPositiveInteger } from "./errors.ts";
import { MambaModel } from "./model.ts";
import { headerDtypes, parseShardIndex, SafetensorsFile } from "./safetensors.ts";
import { Session } from "./session.ts";
import { Sampler } from "./sampler.ts";
import {
  type ByteAllocator,
  type LoadProgress,
  type ModelSource,
  openSource,
  readJson,
  type SourceOptions,
} from "./source.ts";
import type { MambaTokenizer } from "./tokenizer.ts";
import { loadGguf, readTokenizer, singleFile } from "./formats.ts";
import { hasTorchWeights, readTorchWeights } from "./torch.ts";
import {
  checkWeightShapes,
  type FiniteVouch,
  loadWeights,
  loadWeightsAsStored,
  type MambaWeights,
  TensorStore,
} from "./weights.ts";
import { FiniteScan } from "./finite_scan.ts";

/** Options of {@link loadModel}. */
export interface LoadOptions extends SourceOptions {
  /**
   * Which backend computes. "auto" (the default) measures the available ones
   * on this model's shapes and picks the fastest (see {@link Mamba.backendReport});
   * a name is used as given, failing if that backend cannot run here.
   */
  backend?: BackendName;
  /** CPU threads for the "wasm" backend (default: all cores where threads are allowed; 1: no workers). */
  threads?: number;
  /**
   * Which build of the "wasm" backend's kernels runs: "relaxed" (relaxed
   * SIMD) or "plain" (fixed-width SIMD only); default "relaxed" where the
   * runtime validates it, else "plain".
   */
  simd?: WasmSimd;
  /**
   * Where "auto" keeps its decisions: default `localStorage` where usable
   * (across runs), else this process's memory; null: measure every time.
   */
  backendCache?: BackendCache | null;
  /** Make "auto" measure again even where a decision is cached, and replace it. */
  remeasure?: boolean;
  /**
   * Streams expected to decode at once (default 1): "auto" measures decoding
   * at this batch, and the warm-up prepares every batch up to it (see
   * {@link Mamba.warmUp}). A server passes its concurrency.
   */
  batch?: number;
  /** Also `console.warn` when "auto" passes over a backend that failed (the report always says). */
  verbose?: boolean;
  /**
   * Where the tokenizer comes from when the model has none of its own (the
   * state-spaces checkpoints use EleutherAI/gpt-neox-20b's): a directory,
   * URL or repo id holding tokenizer.json, or the path or URL of a
   * tokenizer.json. It is read and checked before any weights are.
   */
  tokenizer?: string | URL;
  /**
   * Run {@link Mamba.warmUp} before returning (default true), so that the
   * first prompt does not pay for what a backend does once.
   */
  warmUp?: boolean;
}

export type { BackendName, LoadProgress };

/** Prompt ids of {@link Mamba.warmUp}: enough rows to run the prefill's kernels. */
export const WARM_UP_PROMPT = 8;

/** A loaded Mamba language model with its tokenizer, if it has one. */
export class Mamba {
  /** The normalized hyperparameters. */
  readonly config: MambaConfig;
  /**
   * The model on its backend; its type and members come from `./advanced`.
   *
   * @experimental
   */
  readonly model: MambaModel<unknown>;
  readonly #tokenizer: MambaTokenizer | null;
  readonly #report: BackendReport;

  /**
   * Wraps a model and tokenizer (null: ids only); most users call
   * {@link loadModel} instead. `report` says how the model's backend was
   * chosen (default: explicitly).
   */
  constructor(
    model: MambaModel<unknown>,
    tokenizer: MambaTokenizer | null,
    report?: BackendReport,
  ) {
    this.model = model;
    this.config = model.config;
    this.#tokenizer = tokenizer;
    const name = model.backend.name;
    this.#report = report ?? {
      chosen: name,
      mode: "explicit",
      cached: false,
      reason: "Given with the model",
      candidates: [{ name, available: true }],
      measureMs: 0,
    };
  }

  /**
   * Text to ids and back.
   *
   * @throws {Error} When the model was loaded without a tokenizer (see {@link hasTokenizer}).
   */
  get tokenizer(): MambaTokenizer {
    if (this.#tokenizer) return this.#tokenizer;
    throw new Error(
      "No tokenizer is loaded: the model came without one, so only ids work (forward, " +
        'session); pass loadModel(source, { tokenizer: "EleutherAI/gpt-neox-20b" }) or another ' +
        "path, URL or repo id to use text",
    );
  }

  /** Whether a tokenizer is loaded, so that text methods work. */
  get hasTokenizer(): boolean {
    return this.#tokenizer !== null;
  }

  /** Name of the backend that runs every operation. */
  get backend(): string {
    return this.model.backend.name;
  }

  /**
   * How the backend was chosen: for "auto", every candidate with why it could
   * not run or what its short engine workload measured (and the estimate for
   * the full model from it), and whether the decision came from the cache.
   */
  backendReport(): BackendReport {
    return structuredClone(this.#report);
  }

  /** End-of-sequence id from the config or the tokenizer. */
  get eosTokenId(): number | undefined {
    return this.config.eosTokenId ?? this.#tokenizer?.eosTokenId;
  }

  /** Rows of the logits. */
  get vocabSize(): number {
    return this.config.vocabSize;
  }

  /** Full-sequence forward: logits [ids.length * vocab], row t after ids[0..t]. */
  async forward(ids: readonly number[] | Int32Array): Promise<Float32Array> {
    const array = this.model.tokenIds(ids);
    const slot = this.model.pool.acquire();
    try {
      return await this.model.forward(slot, array);
    } finally {
      this.model.pool.release(slot);
    }
  }

  /** A new recurrent session, or one resumed from a snapshot. */
  session(
    snapshot?:
      | Uint8Array
      | ArrayBuffer
      | ArrayBufferView
      | Promise<Uint8Array | ArrayBuffer | ArrayBufferView>,
  ): Session {
    return new Session(this.model, snapshot);
  }

  /** Streams generated tokens; see {@link GenerateOptions}. */
  generate(prompt: string | readonly number[], options?: GenerateOptions): Generation {
    return generate(this, prompt, options);
  }

  /**
   * Runs a short generation whose tokens are discarded (a prompt of a few
   * ids, then a decode step through the engine), so that what a backend
   * does once, such as compiling kernels or GPU pipelines, growing its scratch
   * memory and first touching the weights, is paid now rather than by the
   * first prompt. {@link loadModel} calls it unless told not to, with its
   * `batch` as `streams`.
   *
   * With `streams` above 1 it also prepares the decode engine for up to that
   * many streams at once: the steps of every batch size and the pieces of
   * short prompts fed together are recorded, which on webgpu compiles the
   * kernels each of them picks; nothing is computed.
   */
  async warmUp(options: { streams?: number } = {}): Promise<void> {
    const streams = checkPositiveInteger("streams", options.streams ?? 1);
    const prompt = Array.from({ length: WARM_UP_PROMPT }, (_, i) => i % this.vocabSize);
    const session = this.session();
    try {
      // The path of `generate`, without text: the prompt through the engine, then its rounds.
      await session.decode({ prompt, maxTokens: 2, sampler: new Sampler({ temperature: 0 }) });
    } finally {
      session.dispose();
    }
    if (streams > 1) await engineFor(this.model).prepare(streams);
  }

  /**
   * Frees what the model holds on its backend (wasm memory and worker threads,
   * the GPU device with its buffers); the model must be idle and must not be
   * used afterwards. Calling it again does nothing.
   */
  dispose(): void {
    this.model.backend.dispose();
  }

  /** Lets `await using model = await loadModel(…)` free the model at the end of the scope. */
  [Symbol.asyncDispose](): Promise<void> {
    this.dispose();
    return Promise.resolve();
  }
}

/**
 * Loads a model from a local directory, a `file:`/`http(s):` URL of a model
 * directory, or a Hugging Face repo id such as `state-spaces/mamba-130m-hf`;
 * or from one GGUF file (a path or URL ending in `.gguf`, or
 * `owner/name/file.gguf` on the hub), which holds the tokenizer too.
 */
export async function loadModel(source: string | URL, options: LoadOptions = {}): Promise<Mamba> {
  checkedBatch(options.batch);
  const gguf = singleFile(source, ".gguf");
  if (gguf) {
    const dir = await openSource(gguf.dir, options);
    const loaded = await loadGguf(dir, gguf.name, options);
    const { backend, report } = await selectBackend(options.backend ?? "auto", loaded.config, {
      threads: options.threads,
      simd: options.simd,
      cache: options.backendCache,
      remeasure: options.remeasure,
      verbose: options.verbose,
      batch: options.batch,
      halfWeights: loaded.halfWeights,
      matrixBlocks: loaded.matrixBlocks,
    });
    const model = new Mamba(
      new MambaModel(backend, loaded.config, loaded.weights),
      loaded.tokenizer,
      report,
    );
    return await warmedUp(model, options);
  }
  const dir = await openSource(source, options);
  const rawConfig = await readJson(dir, "config.json");
  const config = parseConfig(rawConfig, dir.describe("config.json"));
  // The config is checked against the weights' headers first (a config that
  // contradicts them is the file to name, not the tokenizer it then
  // contradicts too), then the tokenizer: both before gigabytes of weights download.
  await checkWeightHeaders(dir, config);
  const tokenizer = await readTokenizer(dir, config.vocabSize, options);
  // Measuring needs only the config; its memory is given back before the weights come.
  const { backend, report } = await selectBackend(options.backend ?? "auto", config, {
    threads: options.threads,
    simd: options.simd,
    cache: options.backendCache,
    remeasure: options.remeasure,
    verbose: options.verbose,
    batch: options.batch,
    halfWeights: savedHalfFormat(rawConfig),
  });
  const { store, vouched } = await readTensors(dir, (size) => backend.hostBytes(size));
  const weights = loadWeightsAsStored(store, config, dir.describe("config.json"), vouched);
  return await warmedUp(
    new Mamba(new MambaModel(backend, config, weights), tokenizer, report),
    options,
  );
}

/** The model after {@link Mamba.warmUp} unless `options.warmUp` is false; disposed if that fails. */
async function warmedUp(model: Mamba, options: LoadOptions): Promise<Mamba> {
  if (options.warmUp === false) return model;
  try {
    await model.warmUp({ streams: options.batch });
  } catch (error) {
    model.dispose();
    throw error;
  }
  return model;
}

/** A checkpoint's normalized config and its checked float32 weights. */
export interface Checkpoint {
  config: MambaConfig;
  weights: MambaWeights<Float32Array>;
}

/** Reads config.json and the weights (single file or shards), without a tokenizer. */
export async function loadCheckpoint(
  source: string | URL,
  options: SourceOptions = {},
): Promise<Checkpoint> {
  const dir = await openSource(source, options);
  const config = await readConfig(dir);
  const { store, vouched } = await readTensors(dir);
  return { config, weights: loadWeights(store, config, dir.describe("config.json"), vouched) };
}

/**
 * The 16-bit format config.json says the weights were saved in (transformers
 * writes `dtype`, earlier `torch_dtype`), or null: "auto" then measures
 * matrices of that format, which a backend may keep 16-bit.
 */
function savedHalfFormat(raw: unknown): HalfFormat | null {
  const json = raw as { dtype?: unknown; torch_dtype?: unknown } | null;
  const dtype = json?.dtype ?? json?.torch_dtype;
  return dtype === "float16" ? "f16" : dtype === "bfloat16" ? "bf16" : null;
}

async function readConfig(dir: ModelSource): Promise<MambaConfig> {
  return parseConfig(await readJson(dir, "config.json"), dir.describe("config.json"));
}

/** The weight files: the shards an index names, or model.safetensors. */
async function weightFileNames(dir: ModelSource): Promise<string[]> {
  const indexName = "model.safetensors.index.json";
  if (!await dir.exists(indexName)) return ["model.safetensors"];
  return [
    ...new Set(parseShardIndex(await readJson(dir, indexName), dir.describe(indexName)).values()),
  ];
}

/**
 * Checks the config against the weight files' headers (every tensor's shape
 * is known before any data is read), so that a config contradicting its
 * weights is refused before "auto" measures or a backend allocates by it.
 * Skipped where a source cannot give a file's first bytes cheaply or a header
 * is longer than them; the weights are checked again when read.
 */
async function checkWeightHeaders(dir: ModelSource, config: MambaConfig): Promise<void> {
  if (!dir.readHead) return;
  const files: SafetensorsFile[] = [];
  for (const name of await weightFileNames(dir)) {
    const file = await dir.readHead(name);
    if (file === null) return;
    const { head, size } = file;
    if (head.length < size) {
      if (head.length < 8) return;
      if (8n + headerLength(head) > BigInt(head.length)) return;
    }
    files.push(SafetensorsFile.parseHeader(head, size, dir.describe(name)));
  }
  checkWeightShapes(new TensorStore(files), config, dir.describe("config.json"));
}

/**
 * Reads the weight files' tensors. A file of F32 tensors only is kept as
 * read, its tensors viewing its bytes: in the memory that `hostBytes` lends
 * (the wasm backend's, so the weights are never held twice), else in memory
 * that a {@link FiniteScan} lends. Either way the scan checks each piece for
 * NaN and Infinity as it lands, while the next one is read, and `vouched`
 * says which tensors it found finite. A file with F16 or BF16 tensors goes
 * into `hostBytes` too where they are 2-byte aligned there (an even header
 * length), for its matrices to stay where they landed.
 */
async function readTensors(
  dir: ModelSource,
  hostBytes?: (byteLength: number) => Uint8Array | undefined,
): Promise<{ store: TensorStore; vouched?: FiniteVouch }> {
  if (
    !await dir.exists("model.safetensors.index.json") && !await dir.exists("model.safetensors") &&
    await hasTorchWeights(dir)
  ) {
    return { store: await readTorchWeights(dir) };
  }
  const scan = new FiniteScan();
  // The arrays of F32 files, whose pieces the scan checks as they land.
  const scanned = new Set<Uint8Array>();
  const allocate: ByteAllocator = (size, head) => {
    const dtypes = headerDtypes(head);
    if (dtypes?.every((dtype) => dtype === "F32")) {
      const bytes = hostBytes?.(size) ?? scan.bytes(size);
      scanned.add(bytes);
      return bytes;
    }
    const halves = dtypes?.some((dtype) => dtype === "F16" || dtype === "BF16");
    return halves && headerLength(head) % 2n === 0n ? hostBytes?.(size) : undefined;
  };
  const onFilled = (bytes: Uint8Array, filled: number) => {
    if (scanned.has(bytes)) scan.observe(bytes, filled);
  };
  const files: SafetensorsFile[] = [];
  for (const name of await weightFileNames(dir)) {
    const bytes = await dir.readBytes(name, allocate, onFilled);
    files.push(SafetensorsFile.parse(bytes, dir.describe(name)));
  }
  return { store: new TensorStore(files), vouched: (values) => scan.vouches(values) };
}

/** The header length a safetensors file's first 8 bytes give. */
function headerLength(head: Uint8Array): bigint {
  return new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true);
}
