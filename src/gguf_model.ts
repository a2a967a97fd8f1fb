/**
 * A Mamba model from one GGUF file as llama.cpp writes it (architecture
 * `mamba`): the config from the `mamba.*` metadata, the weights under
 * llama.cpp's tensor names mapped to transformers' ones, and the tokenizer
 * from the `tokenizer.ggml.*` metadata, so that one file is a complete model.
 *
 * | llama.cpp                | transformers                          |
 * |--------------------------|---------------------------------------|
 * | `token_embd.weight`      | `backbone.embeddings.weight`          |
 * | `blk.N.attn_norm.weight` | `backbone.layers.N.norm.weight`       |
 * | `blk.N.ssm_in.*`         | `backbone.layers.N.mixer.in_proj.*`   |
 * | `blk.N.ssm_conv1d.*`     | `backbone.layers.N.mixer.conv1d.*`    |
 * | `blk.N.ssm_x.weight`     | `backbone.layers.N.mixer.x_proj.weight` |
 * | `blk.N.ssm_dt.*`         | `backbone.layers.N.mixer.dt_proj.*`   |
 * | `blk.N.ssm_a`            | `backbone.layers.N.mixer.A` (A itself, = −exp(A_log)) |
 * | `blk.N.ssm_d`            | `backbone.layers.N.mixer.D`           |
 * | `blk.N.ssm_out.*`        | `backbone.layers.N.mixer.out_proj.*`  |
 * | `output_norm.weight`     | `backbone.norm_f.weight`              |
 * | `output.weight`          | `lm_head.weight` (absent when tied)   |
 *
 * @module
 */

import { type Mamba2Dims, type MambaConfig, normEpsilon } from "./config.ts";
import { ModelFileError } from "./errors.ts";
import { GGML, type GgufFile, type GgufTensorInfo, type GgufValue } from "./gguf.ts";
import { MambaTokenizer } from "./tokenizer.ts";
import { type BlockType, type Halves, type QuantizedMatrix, quantizedMatrix } from "./quant.ts";
import { checkedWhenRead, type TensorFile } from "./weights.ts";

/** The architectures read: llama.cpp's Mamba-1 ("mamba") and Mamba-2 ("mamba2"). */
export type GgufArchitecture = "mamba" | "mamba2";

/** The block tensors both architectures have, llama.cpp's names and transformers'. */
const COMMON_LAYER_NAMES: readonly [string, string][] = [
  ["attn_norm.weight", "norm.weight"],
  ["ssm_in.weight", "mixer.in_proj.weight"],
  ["ssm_in.bias", "mixer.in_proj.bias"],
  ["ssm_conv1d.weight", "mixer.conv1d.weight"],
  ["ssm_conv1d.bias", "mixer.conv1d.bias"],
  ["ssm_a", "mixer.A"],
  ["ssm_d", "mixer.D"],
  ["ssm_out.weight", "mixer.out_proj.weight"],
  ["ssm_out.bias", "mixer.out_proj.bias"],
];

/** llama.cpp's Mamba-1 block tensors and transformers' names of them. */
const LAYER_NAMES: readonly [string, string][] = [
  ...COMMON_LAYER_NAMES,
  ["ssm_x.weight", "mixer.x_proj.weight"],
  ["ssm_dt.weight", "mixer.dt_proj.weight"],
  ["ssm_dt.bias", "mixer.dt_proj.bias"],
];

/**
 * llama.cpp's Mamba-2 block tensors (convert_hf_to_gguf.py's Mamba2Model) and
 * transformers' names of them. ssm_a holds A = -exp(A_log) itself, as
 * [H, 1], ssm_d D as [H, 1], ssm_norm the gated norm's weight as [G,
 * dInner / G], ssm_conv1d the kernel as [channels, dConv].
 */
const MAMBA2_LAYER_NAMES: readonly [string, string][] = [
  ...COMMON_LAYER_NAMES,
  ["ssm_dt.bias", "mixer.dt_bias"],
  ["ssm_norm.weight", "mixer.norm.weight"],
];

const GLOBAL_NAMES: readonly [string, string][] = [
  ["token_embd.weight", "backbone.embeddings.weight"],
  ["output_norm.weight", "backbone.norm_f.weight"],
  ["output.weight", "lm_head.weight"],
];

/** The block tensors' names of `arch`. */
function layerNames(arch: GgufArchitecture): readonly [string, string][] {
  return arch === "mamba2" ? MAMBA2_LAYER_NAMES : LAYER_NAMES;
}

/**
 * transformers' name of a tensor of a llama.cpp model of `arch`, or undefined
 * for a name it does not use.
 */
export function hfTensorName(
  ggufName: string,
  arch: GgufArchitecture = "mamba",
): string | undefined {
  const global = GLOBAL_NAMES.find(([gguf]) => gguf === ggufName);
  if (global) return global[1];
  const match = /^blk\.(\d+)\.(.+)$/.exec(ggufName);
  const layer = match && layerNames(arch).find(([gguf]) => gguf === match[2]);
  return layer ? `backbone.layers.${match[1]}.${layer[1]}` : undefined;
}

/**
 * llama.cpp's name of a transformers tensor of a model of `arch` (see
 * {@link hfTensorName}), or undefined.
 */
export function ggufTensorName(
  hfName: string,
  arch: GgufArchitecture = "mamba",
): string | undefined {
  const global = GLOBAL_NAMES.find(([, hf]) => hf === hfName);
  if (global) return global[0];
  const match = /^backbone\.layers\.(\d+)\.(.+)$/.exec(hfName);
  const layer = match && layerNames(arch).find(([, hf]) => hf === match[2]);
  return layer ? `blk.${match[1]}.${layer[0]}` : undefined;
}

/** The ggml types kept as blocks, and their {@link BlockType}. */
const BLOCK_TYPES: ReadonlyMap<number, BlockType> = new Map([
  [GGML.Q8_0, "q8_0"],
  [GGML.Q4_0, "q4_0"],
  [GGML.Q4_K, "q4_k"],
]);

/** A GGUF file's tensors under transformers' names, for {@link loadWeights}. */
export class GgufTensors implements TensorFile {
  readonly file: string;
  readonly tensors: Map<string, GgufTensorInfo>;
  readonly #gguf: GgufFile;
  readonly #ggufName = new Map<string, string>();
  readonly #allF32: boolean;

  /** Maps every tensor of `gguf`; a name llama.cpp's Mamba does not use is an error. */
  constructor(gguf: GgufFile) {
    this.#gguf = gguf;
    this.file = gguf.file;
    this.tensors = new Map();
    const arch = ggufArchitecture(gguf);
    for (const [name, info] of gguf.tensors) {
      const hf = hfTensorName(name, arch);
      if (!hf) {
        throw new ModelFileError(
          gguf.file,
          `Holds tensor "${name}", which a Mamba model does not have`,
        );
      }
      this.tensors.set(hf, info);
      this.#ggufName.set(hf, name);
    }
    this.#allF32 = [...gguf.tensors.values()].every((info) => info.type === GGML.F32);
  }

  /** The info of a tensor by its transformers name. */
  info(name: string): GgufTensorInfo {
    return this.#gguf.info(this.#ggufName.get(name) ?? name);
  }

  /**
   * A 2-D Q8_0, Q4_0 or Q4_K tensor by its transformers name, as its blocks:
   * a view of the file's bytes, or read from the file each time they are
   * asked for, which the backend copies or dequantizes at upload; checked
   * when taken (a block whose scale is not finite is a {@link ModelFileError}
   * naming the file and the tensor). Null for any other type, which
   * {@link float32} reads.
   */
  quantized(name: string): QuantizedMatrix | null {
    const ggufName = this.#ggufName.get(name) ?? name;
    const info = this.#gguf.info(ggufName);
    const type = BLOCK_TYPES.get(info.type);
    if (type === undefined || info.shape.length !== 2) return null;
    const [rows, cols] = info.shape;
    const { file } = this;
    const gguf = this.#gguf;
    return {
      type,
      rows,
      cols,
      get blocks() {
        return checkedWhenRead(
          file,
          () => quantizedMatrix(type, rows, cols, gguf.raw(ggufName), `Tensor "${ggufName}"`),
        ).blocks;
      },
    };
  }

  /**
   * An F16 or BF16 tensor by its transformers name, as its 16-bit values (a
   * view of the file's bytes, or read from the file when asked for, which
   * the backend copies or widens at upload); null for any other type.
   */
  halves(name: string): Halves | null {
    const ggufName = this.#ggufName.get(name) ?? name;
    const { type } = this.#gguf.info(ggufName);
    if (type !== GGML.F16 && type !== GGML.BF16) return null;
    const gguf = this.#gguf;
    return {
      format: type === GGML.F16 ? "f16" : "bf16",
      get halves() {
        const raw = gguf.raw(ggufName);
        // A view needs 2-byte alignment in its buffer; GGUF aligns tensor data, but not the buffer.
        const bytes = raw.byteOffset % 2 === 0 ? raw : raw.slice();
        return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
      },
    };
  }

  /**
   * A tensor by its transformers name, as float32 (dequantized where stored
   * quantized). A view of the file's bytes where every tensor is F32; else a
   * copy, so that a few small F32 tensors do not keep the whole file alive.
   */
  float32(name: string): Float32Array {
    const values = this.#gguf.float32(this.#ggufName.get(name) ?? name);
    return this.#allF32 || values.buffer !== this.#gguf.bytes.buffer ? values : values.slice();
  }
}

/**
 * The model hyperparameters a GGUF file's metadata gives (architecture
 * `mamba`); the vocabulary size is the embedding's row count.
 *
 * @throws {ModelFileError} For another architecture or missing metadata.
 */
export function ggufConfig(gguf: GgufFile): MambaConfig {
  const arch = ggufArchitecture(gguf);
  if (gguf.metadata.get("mamba.ssm.dt_b_c_rms") === true) {
    throw new ModelFileError(
      gguf.file,
      `Metadata "mamba.ssm.dt_b_c_rms" is true (Falcon-Mamba's norms on dt, B and C), which is not supported`,
    );
  }
  const key = (name: string) => `${arch}.${name}`;
  const dModel = positive(gguf, key("embedding_length"));
  const dInner = positive(gguf, key("ssm.inner_size"));
  const embedding = gguf.info("token_embd.weight");
  const epsKey = key("attention.layer_norm_rms_epsilon");
  const eps = normEpsilon(gguf.metadata.get(epsKey) ?? 1e-5, `Metadata "${epsKey}"`, gguf.file);
  const id = (key: string) => {
    const value = gguf.metadata.get(key);
    return typeof value === "number" && Number.isInteger(value) && value >= 0 ? value : undefined;
  };
  // Mamba-1's R, Mamba-2's heads H (llama.cpp keeps H under the same key).
  const dtRank = positive(gguf, key("ssm.time_step_rank"));
  return {
    dModel,
    nLayer: positive(gguf, key("block_count")),
    dState: positive(gguf, key("ssm.state_size")),
    dConv: positive(gguf, key("ssm.conv_kernel")),
    expand: dInner / dModel,
    dInner,
    dtRank,
    vocabSize: embedding.shape[0],
    eps,
    projBias: gguf.has("blk.0.ssm_in.bias"),
    convBias: gguf.has("blk.0.ssm_conv1d.bias"),
    tieEmbeddings: !gguf.has("output.weight"),
    eosTokenId: id("tokenizer.ggml.eos_token_id"),
    bosTokenId: id("tokenizer.ggml.bos_token_id"),
    ...(arch === "mamba2" ? { mamba2: mamba2Dims(gguf, dInner, dtRank) } : {}),
  };
}

/** The file's `general.architecture`, which must be one this library reads. */
function ggufArchitecture(gguf: GgufFile): GgufArchitecture {
  const arch = gguf.string("general.architecture");
  if (arch === "mamba" || arch === "mamba2") return arch;
  throw new ModelFileError(
    gguf.file,
    `Unsupported architecture "${arch}" in metadata "general.architecture": "mamba" and "mamba2" are read`,
  );
}

/**
 * A Mamba-2 file's SSD sizes: H heads (`mamba2.ssm.time_step_rank`) of dInner
 * / H channels, G groups (`mamba2.ssm.group_count`, default 1) dividing H.
 * llama.cpp keeps neither a chunk size nor a limit on Δ: transformers'
 * defaults (chunks of 256, Δ unclamped), which do not change the results.
 */
function mamba2Dims(gguf: GgufFile, dInner: number, nHeads: number): Mamba2Dims {
  const nGroups = gguf.integer("mamba2.ssm.group_count", 1);
  if (dInner % nHeads !== 0 || nGroups === 0 || nHeads % nGroups !== 0) {
    throw new ModelFileError(
      gguf.file,
      `Metadata "mamba2.ssm.time_step_rank" (heads) ${nHeads} must divide "mamba2.ssm.inner_size" ` +
        `${dInner}, and "mamba2.ssm.group_count" ${nGroups} must divide the heads`,
    );
  }
  return { nHeads, headDim: dInner / nHeads, nGroups, chunkSize: 256, dtLimit: [0, Infinity] };
}

function positive(gguf: GgufFile, key: string): number {
  const value = gguf.integer(key);
  if (value === 0) throw new ModelFileError(gguf.file, `Metadata "${key}" must be positive, got 0`);
  return value;
}

/** ggml's token types (llama_token_type). */
const TOKEN_TYPE = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 };

/** `tokenizer.ggml.pre` values whose pre-tokenizer is GPT-2's byte-level regex. */
const GPT2_PRE_TOKENIZERS = new Set(["default", "gpt-2", "gpt2", "mpt", "olmo"]);

/** Whether the file carries a tokenizer (`tokenizer.ggml.tokens`). */
export function hasGgufTokenizer(gguf: GgufFile): boolean {
  return gguf.metadata.has("tokenizer.ggml.tokens");
}

/**
 * The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata: a GPT-2
 * style byte-level BPE (`tokenizer.ggml.model` "gpt2") with its tokens,
 * merges, token types and BOS/EOS/UNK ids. Control tokens become special
 * tokens and user-defined ones added tokens, as in tokenizer.json.
 *
 * @throws {ModelFileError} For another tokenizer model or malformed metadata.
 */
export function ggufTokenizer(gguf: GgufFile): MambaTokenizer {
  const fail = (problem: string): never => {
    throw new ModelFileError(gguf.file, problem);
  };
  const model = gguf.string("tokenizer.ggml.model");
  if (model !== "gpt2") {
    fail(
      `Unsupported tokenizer model "${model}" in metadata "tokenizer.ggml.model": only "gpt2" (byte-level BPE) is read`,
    );
  }
  const pre = gguf.string("tokenizer.ggml.pre", "default");
  if (!GPT2_PRE_TOKENIZERS.has(pre)) {
    fail(
      `Unsupported pre-tokenizer "${pre}" in metadata "tokenizer.ggml.pre": GPT-2's (${
        [...GPT2_PRE_TOKENIZERS].join(", ")
      }) is read`,
    );
  }
  const tokens = stringArray(gguf, "tokenizer.ggml.tokens", fail);
  const merges = gguf.metadata.has("tokenizer.ggml.merges")
    ? stringArray(gguf, "tokenizer.ggml.merges", fail)
    : [];
  const typesRaw = gguf.metadata.get("tokenizer.ggml.token_type") ?? tokens.map(() => 1);
  if (!Array.isArray(typesRaw) || typesRaw.length !== tokens.length) {
    fail(`Metadata "tokenizer.ggml.token_type" must be an array of ${tokens.length} integers`);
  }
  const types = typesRaw as GgufValue[];

  const vocab: Record<string, number> = {};
  const added: Record<string, unknown>[] = [];
  tokens.forEach((token, id) => {
    const type = types[id];
    if (typeof type !== "number" || type < TOKEN_TYPE.NORMAL || type > TOKEN_TYPE.BYTE) {
      fail(
        `Metadata "tokenizer.ggml.token_type"[${id}] is ${String(type)}, not a token type 1 to 6`,
      );
    }
    if (Object.hasOwn(vocab, token)) return; // A duplicate keeps its first id, as tokenizer.json would.
    vocab[token] = id;
    if (type === TOKEN_TYPE.CONTROL || type === TOKEN_TYPE.USER_DEFINED) {
      const special = type === TOKEN_TYPE.CONTROL;
      added.push({
        id,
        content: token,
        special,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: !special,
      });
    }
  });
  // A file whose vocabulary was cut (a model smaller than its tokenizer) keeps merges it cannot use.
  const usable = merges.filter((merge) => {
    const parts = merge.split(" ");
    return parts.length === 2 && Object.hasOwn(vocab, parts[0]) && Object.hasOwn(vocab, parts[1]) &&
      Object.hasOwn(vocab, parts[0] + parts[1]);
  });
  const byteLevel = {
    type: "ByteLevel",
    add_prefix_space: false,
    trim_offsets: true,
    use_regex: true,
  };
  const tokenizerJson = {
    version: "1.0",
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: null,
    decoder: byteLevel,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: usable,
    },
  };
  const tokenOf = (key: string) => {
    if (!gguf.metadata.has(key)) return undefined;
    const id = gguf.integer(key);
    if (id >= tokens.length) {
      fail(`Metadata "${key}" is ${id} but there are ${tokens.length} tokens`);
    }
    return tokens[id];
  };
  const addBos = gguf.metadata.get("tokenizer.ggml.add_bos_token");
  if (addBos !== undefined && typeof addBos !== "boolean") {
    fail(`Metadata "tokenizer.ggml.add_bos_token" must be a bool, got ${String(addBos)}`);
  }
  return MambaTokenizer.fromJSON(tokenizerJson, {
    bos_token: tokenOf("tokenizer.ggml.bos_token_id"),
    eos_token: tokenOf("tokenizer.ggml.eos_token_id"),
    unk_token: tokenOf("tokenizer.ggml.unknown_token_id"),
    add_bos_token: addBos ?? false,
    clean_up_tokenization_spaces: false,
  }, gguf.file);
}

function stringArray(gguf: GgufFile, key: string, fail: (problem: string) => never): string[] {
  const value = gguf.metadata.get(key);
  if (!Array.isArray(value) || !value.every((item) => typeof item === "string")) {
    fail(`Metadata "${key}" must be an array of strings`);
  }
  return value as string[];
}
