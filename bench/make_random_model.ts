/**
 * Writes an HF-format Mamba checkpoint with random weights, for benchmarks:
 * `deno task make-random-model [dir] [--layers 24] [--d-model 768] [--vocab 50280]`.
 * The default shape is mamba-130m's. Values follow Mamba's initialisation
 * closely enough that activations stay in range (A_log = log(1..N), dt bias
 * giving steps in [0.001, 0.1], small projection weights), so timings reflect
 * real work. The directory defaults to a fresh temp dir; its path is printed.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { convChannels, type MambaConfig, parseConfig } from "../src/config.ts";
import type { Mamba2LayerWeights } from "../src/mamba2.ts";
import { writeSafetensors } from "../src/safetensors.ts";
import type { MambaWeights } from "../src/weights.ts";

/** Shape of the random model. */
export interface RandomModelShape {
  dModel: number;
  nLayer: number;
  vocabSize: number;
  dState: number;
  dConv: number;
  expand: number;
}

/** mamba-130m's shape. */
export const MAMBA_130M: RandomModelShape = {
  dModel: 768,
  nLayer: 24,
  vocabSize: 50280,
  dState: 16,
  dConv: 4,
  expand: 2,
};

/** mamba2-130m's config (state-spaces layout: d_state 128, head_dim 64, one group). */
export const MAMBA2_130M_CONFIG: MambaConfig = parseConfig({
  d_model: 768,
  n_layer: 24,
  vocab_size: 50277,
  pad_vocab_size_multiple: 8,
  ssm_cfg: { layer: "Mamba2" },
}, "mamba2-130m config");

/** A benchmark prompt: `count` ids spread over the vocabulary [0, vocab). */
export function promptIds(count: number, vocab: number): Int32Array {
  return Int32Array.from({ length: count }, (_, i) => (i * 7919 + 13) % vocab);
}

/** The sampled benchmarks' options: top-k 40 with llama.cpp's default temperature, top-p and min-p. */
export const SAMPLED_OPTIONS = { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05 };

/**
 * A deterministic stream of uniform values from xorshift32 seeded with
 * `seed`: each call returns the next `length` of them in [lo, hi), for
 * benchmark and test inputs.
 */
export function xorshiftUniforms(
  seed: number,
): (length: number, lo?: number, hi?: number) => Float32Array {
  let s = seed >>> 0 || 1;
  return (length, lo = -1, hi = 1) => {
    const out = new Float32Array(length);
    for (let i = 0; i < length; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = lo + ((s >>> 0) / 4294967296) * (hi - lo);
    }
    return out;
  };
}

/** `length` uniform values in [lo, hi), the first of {@link xorshiftUniforms}' stream. */
export function uniformFloats(length: number, lo: number, hi: number, seed = 1): Float32Array {
  return xorshiftUniforms(seed)(length, lo, hi);
}

/** The config.json and model.safetensors bytes of a random checkpoint. */
export function randomCheckpoint(
  shape: RandomModelShape,
  seed = 1,
): { config: Record<string, unknown>; safetensors: Uint8Array } {
  const { dModel, nLayer, vocabSize, dState, dConv, expand } = shape;
  const dInner = expand * dModel;
  const dtRank = Math.ceil(dModel / 16);
  const next = xorshiftUniforms(seed);
  const rand = (length: number, scale: number) => next(length, -scale, scale);
  type Entry = { dtype: "F32"; shape: number[]; data: Float32Array };
  const tensors: Record<string, Entry> = {};
  const put = (name: string, dims: number[], data: Float32Array) => {
    tensors[name] = { dtype: "F32", shape: dims, data };
  };
  const ones = (n: number) => new Float32Array(n).fill(1);
  put("backbone.embeddings.weight", [vocabSize, dModel], rand(vocabSize * dModel, 0.1));
  for (let l = 0; l < nLayer; l++) {
    const p = `backbone.layers.${l}.`;
    put(`${p}norm.weight`, [dModel], ones(dModel));
    put(
      `${p}mixer.in_proj.weight`,
      [2 * dInner, dModel],
      rand(2 * dInner * dModel, 1 / Math.sqrt(dModel)),
    );
    put(`${p}mixer.conv1d.weight`, [dInner, 1, dConv], rand(dInner * dConv, 1 / Math.sqrt(dConv)));
    put(`${p}mixer.conv1d.bias`, [dInner], rand(dInner, 0.1));
    put(
      `${p}mixer.x_proj.weight`,
      [dtRank + 2 * dState, dInner],
      rand((dtRank + 2 * dState) * dInner, 1 / Math.sqrt(dInner)),
    );
    put(`${p}mixer.dt_proj.weight`, [dInner, dtRank], rand(dInner * dtRank, 1 / Math.sqrt(dtRank)));
    // Inverse softplus of steps spread log-uniformly over [0.001, 0.1].
    const dtBias = rand(dInner, 1).map((r) => {
      const dt = Math.exp(Math.log(0.001) + (r + 1) / 2 * (Math.log(0.1) - Math.log(0.001)));
      return dt + Math.log(-Math.expm1(-dt));
    });
    put(`${p}mixer.dt_proj.bias`, [dInner], dtBias);
    const aLog = new Float32Array(dInner * dState);
    for (let i = 0; i < aLog.length; i++) aLog[i] = Math.log(1 + (i % dState));
    put(`${p}mixer.A_log`, [dInner, dState], aLog);
    put(`${p}mixer.D`, [dInner], ones(dInner));
    put(
      `${p}mixer.out_proj.weight`,
      [dModel, dInner],
      rand(dModel * dInner, 1 / Math.sqrt(dInner) / nLayer),
    );
  }
  put("backbone.norm_f.weight", [dModel], ones(dModel));
  const config = {
    architectures: ["MambaForCausalLM"],
    model_type: "mamba",
    hidden_size: dModel,
    num_hidden_layers: nLayer,
    vocab_size: vocabSize,
    state_size: dState,
    conv_kernel: dConv,
    expand,
    intermediate_size: dInner,
    time_step_rank: dtRank,
    layer_norm_epsilon: 1e-5,
    use_bias: false,
    use_conv_bias: true,
    tie_word_embeddings: true,
    residual_in_fp32: true,
    bos_token_id: 0,
    eos_token_id: 0,
    pad_token_id: 0,
  };
  return { config, safetensors: writeSafetensors(tensors, { format: "pt" }) };
}

/**
 * The 130m-shaped model the benches run: `$MAMBA_BENCH_MODEL` when set (a
 * directory written by `deno task make-random-model`), else one written to a
 * new temp dir.
 */
export async function benchModelDir(): Promise<string> {
  const fromEnv = Deno.env.get("MAMBA_BENCH_MODEL");
  if (fromEnv) return fromEnv;
  const dir = await Deno.makeTempDir({ prefix: "mamba-bench-" });
  await writeRandomModel(dir, MAMBA_130M);
  return dir;
}

/**
 * `dir` with a tokenizer: `tokenizerDir`'s tokenizer.json and
 * tokenizer_config.json (default: ../shared's gpt-neox-20b) copied in where
 * it has none. A GGUF file holds its own and is returned as it is.
 */
export async function withTokenizer(dir: string, tokenizerDir?: string): Promise<string> {
  if (dir.toLowerCase().endsWith(".gguf")) return dir;
  const tokenizer = tokenizerDir ??
    new URL("../../shared/tokenizers/gpt-neox-20b", import.meta.url).pathname;
  for (const file of ["tokenizer.json", "tokenizer_config.json"]) {
    try {
      await Deno.stat(`${dir}/${file}`);
    } catch {
      await Deno.copyFile(`${tokenizer}/${file}`, `${dir}/${file}`);
    }
  }
  return dir;
}

/** Random weights of a Mamba-2 model of `config`, initialised as mamba_ssm does, tied head. */
export function randomMamba2Weights(config: MambaConfig): MambaWeights<Float32Array> {
  const { dModel, dInner, dConv, nLayer, vocabSize } = config;
  const heads = config.mamba2!.nHeads;
  const convDim = convChannels(config);
  const next = xorshiftUniforms(1);
  const rand = (length: number, scale: number) => next(length, -scale, scale);
  const ones = (n: number) => new Float32Array(n).fill(1);
  const layer = (): Mamba2LayerWeights<Float32Array> => ({
    norm: ones(dModel),
    inProj: rand((dInner + convDim + heads) * dModel, 1 / Math.sqrt(dModel)),
    inProjBias: null,
    convWeight: rand(convDim * dConv, 1 / Math.sqrt(dConv)),
    convBias: rand(convDim, 0.1),
    // Inverse softplus of steps spread log-uniformly over [0.001, 0.1].
    dtBias: rand(heads, 1).map((r) => {
      const dt = Math.exp(Math.log(0.001) + (r + 1) / 2 * (Math.log(0.1) - Math.log(0.001)));
      return dt + Math.log(-Math.expm1(-dt));
    }),
    A: Float32Array.from({ length: heads }, (_, h) => -(1 + (h % 16))),
    D: ones(heads),
    gatedNorm: ones(dInner),
    outProj: rand(dModel * dInner, 1 / Math.sqrt(dInner) / nLayer),
    outProjBias: null,
  });
  const embedding = rand(vocabSize * dModel, 0.1);
  return {
    embedding,
    lmHead: embedding,
    normF: ones(dModel),
    layers: Array.from({ length: nLayer }, layer),
  };
}

/** Writes a random checkpoint into `dir` (created if needed). */
export async function writeRandomModel(
  dir: string,
  shape: RandomModelShape,
  seed = 1,
): Promise<void> {
  const { config, safetensors } = randomCheckpoint(shape, seed);
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config, null, 2));
  await Deno.writeFile(`${dir}/model.safetensors`, safetensors);
}

if (import.meta.main) {
  const flags = parseArgs(Deno.args, {
    string: ["layers", "d-model", "vocab", "seed"],
  });
  const dir = String(flags._[0] ?? await Deno.makeTempDir({ prefix: "mamba-random-" }));
  const shape: RandomModelShape = {
    ...MAMBA_130M,
    nLayer: Number(flags.layers ?? MAMBA_130M.nLayer),
    dModel: Number(flags["d-model"] ?? MAMBA_130M.dModel),
    vocabSize: Number(flags.vocab ?? MAMBA_130M.vocabSize),
  };
  await writeRandomModel(dir, shape, Number(flags.seed ?? 1));
  console.log(dir);
}
