/**
 * The parts of {@link loadModel} that read formats other than an HF
 * directory of safetensors: a single GGUF file, and a tokenizer from
 * elsewhere (or none).
 *
 * @module
 */

import type { HalfFormat } from "./quant.ts";
import type { MambaConfig } from "./config.ts";
import type { MatrixBlocks } from "./dispatch.ts";
import { ModelFileError } from "./errors.ts";
import { GGML, GgufFile } from "./gguf.ts";
import { ggufConfig, GgufTensors, ggufTokenizer, hasGgufTokenizer } from "./gguf_model.ts";
import {
  type ModelSource,
  openSource,
  readFileHead,
  readFileRange,
  readJson,
  type SourceOptions,
} from "./source.ts";
import { MambaTokenizer } from "./tokenizer.ts";
import { type HostMatrix, isQuantized } from "./quant.ts";
import { type HostWeights, loadWeightsAsStored, TensorStore } from "./weights.ts";

/**
 * Where a source names one file with extension `extension` (a path, a URL,
 * or `owner/name/file` on the hub): the source of its directory and its
 * name; null for anything else.
 */
export function singleFile(
  source: string | URL,
  extension: string,
): { dir: string | URL; name: string } | null {
  if (source instanceof URL || /^(https?|file):/i.test(source)) {
    const url = new URL(source);
    if (!url.pathname.toLowerCase().endsWith(extension)) return null;
    const name = decodeURIComponent(url.pathname.slice(url.pathname.lastIndexOf("/") + 1));
    return { dir: new URL(".", url), name };
  }
  if (!source.toLowerCase().endsWith(extension)) return null;
  const slash = source.lastIndexOf("/");
  return { dir: slash < 0 ? "." : source.slice(0, slash) || "/", name: source.slice(slash + 1) };
}

/** Options {@link readTokenizer} and {@link loadGguf} use. */
export interface TokenizerOptions extends SourceOptions {
  /** Where the tokenizer comes from instead: see `LoadOptions.tokenizer`. */
  tokenizer?: string | URL;
}

/**
 * The tokenizer of a model directory: `options.tokenizer`'s where given
 * (a directory, URL or repo id with tokenizer.json, or a tokenizer.json
 * itself), else the directory's own tokenizer.json, else null (ids only).
 * Checked against the model's `vocabSize` embedding rows.
 */
export async function readTokenizer(
  dir: ModelSource,
  vocabSize: number,
  options: TokenizerOptions = {},
): Promise<MambaTokenizer | null> {
  let source = dir;
  let name = "tokenizer.json";
  if (options.tokenizer !== undefined) {
    const file = singleFile(options.tokenizer, ".json");
    source = await openSource(file?.dir ?? options.tokenizer, options);
    name = file?.name ?? name;
  } else if (!await dir.exists(name)) {
    return null;
  }
  const tokenizerConfig = await source.exists("tokenizer_config.json")
    ? await readJson(source, "tokenizer_config.json")
    : undefined;
  const tokenizer = MambaTokenizer.fromJSON(
    await readJson(source, name),
    tokenizerConfig,
    source.describe(name),
    vocabSize,
  );
  checkVocabulary(tokenizer, vocabSize);
  return tokenizer;
}

function checkVocabulary(tokenizer: MambaTokenizer, vocabSize: number): void {
  if (tokenizer.vocabSize > vocabSize) {
    throw new ModelFileError(
      tokenizer.file,
      `Knows ${tokenizer.vocabSize} token ids but the model has only ${vocabSize} embedding rows`,
    );
  }
}

/** What one GGUF file holds. */
export interface GgufModel {
  /** The hyperparameters from the `mamba.*` metadata. */
  config: MambaConfig;
  /**
   * The weights, checked against the config: float32, except Q8_0 matrices,
   * kept as blocks (a backend without kernels for them gets them dequantized).
   */
  weights: HostWeights;
  /** The file's own tokenizer, or `options.tokenizer`'s, or null. */
  tokenizer: MambaTokenizer | null;
  /**
   * The 16-bit format of the matrices: BF16, F16, or F16 for a quantized
   * file (its matrices that are not whole blocks are written F16); null for
   * F32.
   */
  halfWeights: HalfFormat | null;
  /** Which matrices are kept as blocks, for `auto` to measure alike. */
  matrixBlocks: MatrixBlocks;
}

/**
 * Reads GGUF file `name` of `dir`: config, weights (Q8_0, Q4_0 and Q4_K matrices as their
 * blocks, other types as float32) and tokenizer (`options.tokenizer` where given, else the file's own).
 */
export async function loadGguf(
  dir: ModelSource,
  name: string,
  options: TokenizerOptions = {},
): Promise<GgufModel> {
  const file = dir.describe(name);
  const gguf = await readGguf(dir, name);
  const config = ggufConfig(gguf);
  let tokenizer: MambaTokenizer | null = null;
  if (options.tokenizer !== undefined) {
    tokenizer = await readTokenizer(dir, config.vocabSize, options);
  } else if (hasGgufTokenizer(gguf)) {
    tokenizer = ggufTokenizer(gguf);
    checkVocabulary(tokenizer, config.vocabSize);
  }
  const weights = loadWeightsAsStored(new TensorStore([new GgufTensors(gguf)]), config, file);
  const inProjType = gguf.info("blk.0.ssm_in.weight").type;
  const halfWeights = inProjType === GGML.F32 ? null : inProjType === GGML.BF16 ? "bf16" : "f16";
  const blockType = (matrix: HostMatrix | undefined) =>
    matrix && isQuantized(matrix) ? matrix.type : null;
  const firstLayer = weights.layers[0];
  const matrixBlocks: MatrixBlocks = {
    layers: blockType(firstLayer?.inProj),
    head: blockType(weights.embedding),
  };
  return { config, weights, tokenizer, halfWeights, matrixBlocks };
}

/**
 * GGUF file `name` of `dir`: where the source has it as a local file
 * ({@link ModelSource.localPath}), its header from its first bytes (as many
 * as it takes) and each tensor from the file as it is asked for, so that the
 * file is never held whole beside the backend's copy of its weights; else
 * the whole file, read at once.
 */
export async function readGguf(dir: ModelSource, name: string): Promise<GgufFile> {
  const file = dir.describe(name);
  const path = await dir.localPath?.(name);
  const first = path ? await readFileHead(path) : null;
  if (!path || !first) return GgufFile.parse(await dir.readBytes(name), file);
  const { size } = first;
  const readRange = (offset: number, length: number) => readFileRange(path, offset, length);
  // A header past the first bytes (a large vocabulary in the metadata): four times as many, then
  // four times that, up to the whole file, where any error is the file's.
  for (let head = first.head;; head = readRange(0, Math.min(size, 4 * head.length))) {
    try {
      return GgufFile.parseHead(head, size, file, readRange);
    } catch (error) {
      if (head.length >= size) throw error;
    }
  }
}
