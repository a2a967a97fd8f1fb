/**
 * `deno task quantize <model> <out.gguf> --type q8_0|q4_0|q4_k|f16|bf16|f32`: writes a
 * checkpoint (a directory, URL or repo id with safetensors or
 * pytorch_model.bin weights) as a GGUF file that llama.cpp and
 * {@link loadModel} read, with its tokenizer embedded when it has a
 * byte-level BPE tokenizer.json.
 *
 * A Mamba-1 model becomes llama.cpp's architecture "mamba", a Mamba-2 one
 * "mamba2" (tensors laid out as llama.cpp's converter lays them out).
 *
 * The weight matrices (embedding, in_proj, x_proj, dt_proj, out_proj,
 * lm_head) take the chosen type, except that q4_0 and q4_k files keep the
 * output projection (the embedding, where it is tied) in q8_0, as llama.cpp
 * keeps it at higher precision; a matrix whose rows are not a multiple of
 * the type's block (mamba-130m's dt_proj has 48 columns) is written F16, with
 * a note, as llama.cpp does. Norms, biases, the convolution, A and D stay F32,
 * as llama.cpp keeps them.
 *
 * @module
 */

import { convChannels, type MambaConfig } from "./config.ts";
import { ModelFileError } from "./errors.ts";
import { GGML, GGML_TYPES, typeName } from "./gguf.ts";
import {
  type GgufEntry,
  type GgufTensorData,
  quantize,
  QUANTIZED_TYPES,
  writeGguf,
} from "./gguf_write.ts";
import { loadCheckpoint } from "./load.ts";
import { openSource, readJson, type SourceOptions } from "./source.ts";
import type { MambaWeights } from "./weights.ts";
import { isMamba2Layer, type Mamba2LayerWeights } from "./mamba2.ts";

/** A type `quantize` writes: the `--type` flag's values. */
export type QuantizeType = "f32" | "f16" | "bf16" | "q8_0" | "q4_0" | "q4_k";

/** llama.cpp's general.file_type (llama_ftype) for each type. */
const FILE_TYPES: Record<QuantizeType, number> = {
  f32: 0,
  f16: 1,
  bf16: 32,
  q4_0: 2,
  q8_0: 7,
  q4_k: 14,
};

/** A GGUF written by {@link quantizeModel}, and what it could not write as asked. */
export interface QuantizedModel {
  /** The whole file. */
  bytes: Uint8Array;
  /** One line per matrix written F16 instead, or tokenizer left out. */
  notes: string[];
}

/** Reads a checkpoint and writes it as a GGUF file of matrices in `type`. */
export async function quantizeModel(
  source: string | URL,
  type: QuantizeType,
  options: SourceOptions = {},
): Promise<QuantizedModel> {
  const { config, weights } = await loadCheckpoint(source, options);
  const dir = await openSource(source, options);
  if (config.mixerRmsEps !== undefined) {
    throw new ModelFileError(
      dir.describe("config.json"),
      "quantize writes Mamba-1 and Mamba-2 models; this config describes Falcon-Mamba",
    );
  }
  // llama.cpp's architecture, whose name prefixes the model's metadata keys.
  const arch = config.mamba2 ? "mamba2" : "mamba";
  const notes: string[] = [];
  const metadata = new Map<string, GgufEntry>([
    ["general.architecture", { type: "string", value: arch }],
    ["general.name", {
      type: "string",
      value: String(source).replace(/\/+$/, "").split("/").pop()!,
    }],
    ["general.alignment", { type: "u32", value: 32 }],
    [`${arch}.context_length`, { type: "u32", value: 1 << 20 }],
    [`${arch}.embedding_length`, { type: "u32", value: config.dModel }],
    [`${arch}.feed_forward_length`, { type: "u32", value: 0 }],
    [`${arch}.attention.head_count`, { type: "u32", value: 0 }],
    [`${arch}.block_count`, { type: "u32", value: config.nLayer }],
    [`${arch}.ssm.conv_kernel`, { type: "u32", value: config.dConv }],
    [`${arch}.ssm.inner_size`, { type: "u32", value: config.dInner }],
    [`${arch}.ssm.state_size`, { type: "u32", value: config.dState }],
    // Mamba-1's R; Mamba-2's heads H, which llama.cpp keeps under the same key.
    [`${arch}.ssm.time_step_rank`, { type: "u32", value: config.dtRank }],
    [`${arch}.attention.layer_norm_rms_epsilon`, { type: "f32", value: config.eps }],
    ...(config.mamba2
      ? [["mamba2.ssm.group_count", { type: "u32", value: config.mamba2.nGroups }] as const]
      : [["mamba.ssm.dt_b_c_rms", { type: "bool", value: false }] as const]),
    ["general.file_type", { type: "u32", value: FILE_TYPES[type] }],
    ["general.quantization_version", { type: "u32", value: 2 }],
  ]);
  if (await dir.exists("tokenizer.json")) {
    const tokenizerConfig = await dir.exists("tokenizer_config.json")
      ? await readJson(dir, "tokenizer_config.json")
      : {};
    const entries = tokenizerMetadata(
      await readJson(dir, "tokenizer.json"),
      tokenizerConfig,
      config,
      dir.describe("tokenizer.json"),
    );
    if (typeof entries === "string") notes.push(entries);
    else for (const [key, entry] of entries) metadata.set(key, entry);
  } else {
    notes.push("No tokenizer.json: the file holds no tokenizer");
  }
  const tensors = ggufTensors(config, weights, QUANTIZED_TYPES[type], notes);
  return { bytes: writeGguf(metadata, tensors), notes };
}

/** The model's tensors under llama.cpp's names, matrices in `matrixType`. */
function ggufTensors(
  config: MambaConfig,
  weights: MambaWeights<Float32Array>,
  matrixType: number,
  notes: string[],
): GgufTensorData[] {
  const { dModel, dInner, dState, dConv, dtRank, vocabSize } = config;
  const tensors: GgufTensorData[] = [];
  const plain = (name: string, shape: number[], values: Float32Array | null) => {
    if (values) tensors.push({ name, shape, type: GGML.F32, data: quantize(GGML.F32, values) });
  };
  const matrix = (name: string, shape: number[], values: Float32Array, wanted = matrixType) => {
    const { blockSize } = GGML_TYPES.get(wanted)!;
    let type = wanted;
    if (shape[1] % blockSize !== 0) {
      type = GGML.F16;
      notes.push(
        `${name} [${shape.join(", ")}]: rows of ${shape[1]} are not a multiple of ${
          typeName(wanted)
        }'s block of ${blockSize}, written F16`,
      );
    }
    tensors.push({ name, shape, type, data: quantize(type, values) });
  };
  // The output projection's errors go straight into the logits: in 4-bit files
  // it keeps 8 bits (llama.cpp keeps 6 there), the embedding too where tied.
  const outputType = matrixType === GGML.Q4_0 || matrixType === GGML.Q4_K ? GGML.Q8_0 : matrixType;
  const tied = weights.lmHead === weights.embedding;
  matrix(
    "token_embd.weight",
    [vocabSize, dModel],
    weights.embedding,
    tied ? outputType : matrixType,
  );
  weights.layers.forEach((layer, i) => {
    const p = `blk.${i}.`;
    if (isMamba2Layer<Float32Array>(layer)) {
      mamba2Tensors(p, config, layer, plain, matrix);
      return;
    }
    plain(`${p}attn_norm.weight`, [dModel], layer.norm);
    matrix(`${p}ssm_in.weight`, [2 * dInner, dModel], layer.inProj);
    plain(`${p}ssm_in.bias`, [2 * dInner], layer.inProjBias);
    plain(`${p}ssm_conv1d.weight`, [dInner, dConv], layer.convWeight);
    plain(`${p}ssm_conv1d.bias`, [dInner], layer.convBias);
    matrix(`${p}ssm_x.weight`, [dtRank + 2 * dState, dInner], layer.xProj);
    matrix(`${p}ssm_dt.weight`, [dInner, dtRank], layer.dtProj);
    plain(`${p}ssm_dt.bias`, [dInner], layer.dtProjBias);
    plain(`${p}ssm_a`, [dInner, dState], layer.A);
    plain(`${p}ssm_d`, [dInner], layer.D);
    matrix(`${p}ssm_out.weight`, [dModel, dInner], layer.outProj);
    plain(`${p}ssm_out.bias`, [dModel], layer.outProjBias);
  });
  plain("output_norm.weight", [dModel], weights.normF);
  if (!tied) matrix("output.weight", [vocabSize, dModel], weights.lmHead, outputType);
  return tensors;
}

/**
 * A Mamba-2 block's tensors as llama.cpp's converter writes them: A itself
 * (not A_log) and D as [H, 1], the gated norm's weight as [G, dInner / G],
 * the conv kernel as [channels, dConv], dt's bias as ssm_dt.bias.
 */
function mamba2Tensors(
  p: string,
  config: MambaConfig,
  layer: Mamba2LayerWeights<Float32Array>,
  plain: (name: string, shape: number[], values: Float32Array | null) => void,
  matrix: (name: string, shape: number[], values: Float32Array) => void,
): void {
  const { dModel, dInner, dConv } = config;
  const { nHeads, nGroups } = config.mamba2!;
  const channels = convChannels(config);
  const inRows = dInner + channels + nHeads;
  plain(`${p}attn_norm.weight`, [dModel], layer.norm);
  matrix(`${p}ssm_in.weight`, [inRows, dModel], layer.inProj);
  plain(`${p}ssm_in.bias`, [inRows], layer.inProjBias);
  plain(`${p}ssm_conv1d.weight`, [channels, dConv], layer.convWeight);
  plain(`${p}ssm_conv1d.bias`, [channels], layer.convBias);
  plain(`${p}ssm_dt.bias`, [nHeads], layer.dtBias);
  plain(`${p}ssm_a`, [nHeads, 1], layer.A);
  plain(`${p}ssm_d`, [nHeads, 1], layer.D);
  plain(`${p}ssm_norm.weight`, [nGroups, dInner / nGroups], layer.gatedNorm);
  matrix(`${p}ssm_out.weight`, [dModel, dInner], layer.outProj);
  plain(`${p}ssm_out.bias`, [dModel], layer.outProjBias);
}

/** ggml token types. */
const NORMAL = 1, CONTROL = 3, USER_DEFINED = 4;

/**
 * A byte-level BPE tokenizer.json as `tokenizer.ggml.*` metadata, its
 * tokens padded to the model's rows; or why it cannot be (a note).
 */
function tokenizerMetadata(
  json: unknown,
  tokenizerConfig: unknown,
  config: MambaConfig,
  file: string,
): Map<string, GgufEntry> | string {
  const tokenizer = json as {
    model?: { type?: string; vocab?: Record<string, number>; merges?: (string | string[])[] };
    pre_tokenizer?: { type?: string };
    added_tokens?: { id: number; content: string; special?: boolean }[];
  };
  const model = tokenizer.model;
  if (
    model?.type !== "BPE" || tokenizer.pre_tokenizer?.type !== "ByteLevel" ||
    typeof model.vocab !== "object" || !Array.isArray(model.merges)
  ) {
    return "The tokenizer is not a byte-level BPE: the file holds no tokenizer";
  }
  const tokens: (string | undefined)[] = new Array(config.vocabSize);
  const types = new Array<number>(config.vocabSize).fill(NORMAL);
  const place = (content: string, id: number, type: number) => {
    if (!Number.isInteger(id) || id < 0 || id >= config.vocabSize) {
      throw new ModelFileError(
        file,
        `Token ${
          JSON.stringify(content)
        } has id ${id}, outside the model's ${config.vocabSize} rows`,
      );
    }
    tokens[id] = content;
    types[id] = type;
  };
  for (const [content, id] of Object.entries(model.vocab)) place(content, id, NORMAL);
  for (const added of tokenizer.added_tokens ?? []) {
    place(added.content, added.id, added.special ? CONTROL : USER_DEFINED);
  }
  for (let id = 0; id < tokens.length; id++) {
    if (tokens[id] === undefined) (tokens[id] = `[PAD${id}]`, types[id] = USER_DEFINED);
  }
  const merges = model.merges.map((merge) => Array.isArray(merge) ? merge.join(" ") : merge);
  const entries = new Map<string, GgufEntry>([
    ["tokenizer.ggml.model", { type: "string", value: "gpt2" }],
    ["tokenizer.ggml.pre", { type: "string", value: "gpt-2" }],
    ["tokenizer.ggml.tokens", { type: "string[]", value: tokens as string[] }],
    ["tokenizer.ggml.token_type", { type: "i32[]", value: types }],
    ["tokenizer.ggml.merges", { type: "string[]", value: merges }],
  ]);
  const special = (tokenizerConfig ?? {}) as Record<string, unknown>;
  const idOf = (key: string, fallback?: number) => {
    const value = special[key];
    const content = typeof value === "string"
      ? value
      : (value as { content?: unknown } | null)?.content;
    const id = typeof content === "string" ? tokens.indexOf(content) : -1;
    return id >= 0 ? id : fallback;
  };
  for (
    const [key, id] of [
      ["tokenizer.ggml.bos_token_id", idOf("bos_token", config.bosTokenId)],
      ["tokenizer.ggml.eos_token_id", idOf("eos_token", config.eosTokenId)],
      ["tokenizer.ggml.unknown_token_id", idOf("unk_token")],
    ] as const
  ) {
    if (id !== undefined) entries.set(key, { type: "u32", value: id });
  }
  entries.set("tokenizer.ggml.add_bos_token", {
    type: "bool",
    value: special.add_bos_token === true,
  });
  return entries;
}

const HELP = `Usage: deno task quantize <model> <out.gguf> --type q8_0|q4_0|q4_k|f16|bf16|f32

Writes a checkpoint (directory, URL or HF repo id; safetensors or pytorch_model.bin)
as a GGUF file that llama.cpp and loadModel read. Matrices take the type (q4_0 and q4_k
files keep the output projection in q8_0); those whose rows are not a multiple of its
block are written F16 (each is noted on stderr).`;

/** The CLI's arguments: two paths and `--type`, or null where they are not that. */
function parseCommandLine(
  args: string[],
): { source: string; out: string; type: QuantizeType } | null {
  const paths: string[] = [];
  let type: string | undefined;
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--type") type = args[++i];
    else if (args[i].startsWith("--type=")) type = args[i].slice("--type=".length);
    else if (args[i].startsWith("-")) return null;
    else paths.push(args[i]);
  }
  if (paths.length !== 2 || type === undefined || !Object.hasOwn(QUANTIZED_TYPES, type)) {
    return null;
  }
  return { source: paths[0], out: paths[1], type: type as QuantizeType };
}

if (import.meta.main) {
  // No @std/cli here: the module is part of the library, which is imported by URL without an import map.
  const command = parseCommandLine(Deno.args);
  if (!command) {
    console.error(HELP);
    Deno.exit(Deno.args.includes("--help") || Deno.args.includes("-h") ? 0 : 2);
  }
  try {
    const { bytes, notes } = await quantizeModel(command.source, command.type);
    for (const note of notes) console.error(`note: ${note}`);
    await Deno.writeFile(command.out, bytes);
    console.error(`wrote ${command.out} (${bytes.length} bytes, ${command.type})`);
  } catch (error) {
    console.error(error instanceof Error ? error.message : String(error));
    Deno.exit(1);
  }
}
