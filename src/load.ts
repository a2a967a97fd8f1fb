/**
 * {@link loadModel}: reads an HF-format Mamba checkpoint (config.json,
 * model.safetensors or its shards, tokenizer.json) from a directory, a URL or
 * the hub, and returns a ready {@link Mamba}.
 *
 * @module
 */

import { type BackendName, createBackend } from "./backends/registry.ts";
import { type MambaConfig, parseConfig } from "./config.ts";
import { generate, type GenerateOptions, type Generation } from "./generate.ts";
import { MambaModel } from "./model.ts";
import { parseShardIndex, SafetensorsFile } from "./safetensors.ts";
import { Session } from "./session.ts";
import { ModelFileError } from "./errors.ts";
import {
  type LoadProgress,
  type ModelSource,
  openSource,
  readJson,
  type SourceOptions,
} from "./source.ts";
import { MambaTokenizer } from "./tokenizer.ts";
import { loadWeights, type MambaWeights, TensorStore } from "./weights.ts";

/** Options of {@link loadModel}. */
export interface LoadOptions extends SourceOptions {
  /** Which backend computes; "auto" (the default) picks the fastest available. */
  backend?: BackendName;
  /** CPU threads for the "wasm" backend (default: all cores; 1: no workers). */
  threads?: number;
}

export type { BackendName, LoadProgress };

/** A loaded Mamba language model with its tokenizer. */
export class Mamba {
  /** The normalized hyperparameters. */
  readonly config: MambaConfig;
  /** Text to ids and back. */
  readonly tokenizer: MambaTokenizer;
  /** The model on its backend. */
  readonly model: MambaModel<unknown>;

  /** Wraps a model and tokenizer; most users call {@link loadModel} instead. */
  constructor(model: MambaModel<unknown>, tokenizer: MambaTokenizer) {
    this.model = model;
    this.config = model.config;
    this.tokenizer = tokenizer;
  }

  /** Name of the backend that runs every operation. */
  get backend(): string {
    return this.model.backend.name;
  }

  /** End-of-sequence id from the config or the tokenizer. */
  get eosTokenId(): number | undefined {
    return this.config.eosTokenId ?? this.tokenizer.eosTokenId;
  }

  /** Rows of the logits. */
  get vocabSize(): number {
    return this.config.vocabSize;
  }

  /** Full-sequence forward: logits [ids.length * vocab], row t after ids[0..t]. */
  async forward(ids: readonly number[] | Int32Array): Promise<Float32Array> {
    const array = Int32Array.from(ids);
    const vocab = this.config.vocabSize;
    array.forEach((id, i) => {
      if (id !== ids[i] || id < 0 || id >= vocab) {
        throw new RangeError(
          `Unknown token id ${ids[i]}: the model's vocabulary has ids 0 to ${vocab - 1}`,
        );
      }
    });
    const state = this.model.newState();
    try {
      return await this.model.run(state, array, "all");
    } finally {
      this.model.releaseState(state);
    }
  }

  /** A new recurrent session, or one resumed from a snapshot. */
  session(snapshot?: Uint8Array | Promise<Uint8Array>): Session {
    return new Session(this.model, snapshot);
  }

  /** Streams generated tokens; see {@link GenerateOptions}. */
  generate(prompt: string | readonly number[], options?: GenerateOptions): Generation {
    return generate(this, prompt, options);
  }
}

/**
 * Loads a model from a local directory, a `file:`/`http(s):` URL of a model
 * directory, or a Hugging Face repo id such as `state-spaces/mamba-130m-hf`.
 */
export async function loadModel(source: string | URL, options: LoadOptions = {}): Promise<Mamba> {
  const dir = await openSource(source, options);
  const { config, weights } = await readCheckpoint(dir);
  const tokenizerConfig = await dir.exists("tokenizer_config.json")
    ? await readJson(dir, "tokenizer_config.json")
    : undefined;
  const tokenizer = MambaTokenizer.fromJSON(
    await readJson(dir, "tokenizer.json"),
    tokenizerConfig,
    dir.describe("tokenizer.json"),
  );
  if (tokenizer.vocabSize > config.vocabSize) {
    throw new ModelFileError(
      dir.describe("tokenizer.json"),
      `Knows ${tokenizer.vocabSize} token ids but the model has only ${config.vocabSize} embedding rows`,
    );
  }
  const backend = await createBackend(options.backend ?? "auto", { threads: options.threads });
  return new Mamba(new MambaModel(backend, config, weights), tokenizer);
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
  return readCheckpoint(await openSource(source, options));
}

async function readCheckpoint(dir: ModelSource): Promise<Checkpoint> {
  const configFile = dir.describe("config.json");
  const config = parseConfig(await readJson(dir, "config.json"), configFile);

  const files: SafetensorsFile[] = [];
  if (await dir.exists("model.safetensors.index.json")) {
    const indexName = "model.safetensors.index.json";
    const shards = new Set(
      parseShardIndex(await readJson(dir, indexName), dir.describe(indexName)).values(),
    );
    for (const shard of shards) {
      files.push(SafetensorsFile.parse(await dir.readBytes(shard), dir.describe(shard)));
    }
  } else {
    files.push(
      SafetensorsFile.parse(
        await dir.readBytes("model.safetensors"),
        dir.describe("model.safetensors"),
      ),
    );
  }
  return { config, weights: loadWeights(new TensorStore(files), config, configFile) };
}
