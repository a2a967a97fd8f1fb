/**
 * Mamba-2 and Falcon-Mamba against the reference data of ../shared: configs
 * in both layouts, and on every backend that runs them, through the public
 * API (loadModel, forward, generate, sessions, snapshots, the decode engine)
 * against ../shared/fixtures/mamba2/tiny-groups2 (mamba_ssm's semantics) and
 * ../shared/fixtures/hf-oracle/falcon-mamba-tiny (transformers').
 */

import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import {
  type BackendName,
  type BackendOptions,
  BACKENDS as BACKEND_CANDIDATES,
  createBackend,
} from "../src/backends/registry.ts";
import { selectBackend } from "../src/dispatch.ts";
import { parseConfig } from "../src/config.ts";
import { ModelFileError } from "../src/errors.ts";
import { loadCheckpoint, loadModel, type Mamba } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { SafetensorsFile, writeSafetensors } from "../src/safetensors.ts";
import { Sampler } from "../src/sampler.ts";
import { Session } from "../src/session.ts";
import { maxAbsDiff, SHARED, tempDir } from "./helpers.ts";

const MAMBA2 = `${SHARED}/fixtures/mamba2/tiny-groups2`;
const FALCON = `${SHARED}/fixtures/hf-oracle/falcon-mamba-tiny`;

const adapter = await navigator.gpu?.requestAdapter();

/** The backends that run Mamba-2, each with its options. */
const BACKENDS: { label: string; name: BackendName; options?: BackendOptions; ignore?: boolean }[] =
  [
    { label: "js", name: "js" },
    { label: "wasm 1 thread", name: "wasm", options: { threads: 1 } },
    { label: "wasm 2 threads", name: "wasm", options: { threads: 2 } },
    { label: "webgpu", name: "webgpu", ignore: !adapter },
  ];

type Json = Record<string, unknown>;
type Tensors = Parameters<typeof writeSafetensors>[0];

async function readJson(path: string): Promise<Json> {
  return JSON.parse(await Deno.readTextFile(path));
}

async function readTensors(path: string): Promise<Tensors> {
  const file = SafetensorsFile.parse(await Deno.readFile(path), path);
  const tensors: Tensors = {};
  for (const [name, info] of file.tensors) {
    tensors[name] = { dtype: "F32", shape: [...info.shape], data: file.float32(name).slice() };
  }
  return tensors;
}

/** GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell bytes. */
function byteLevelChars(): string[] {
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let extra = 0;
  return Array.from(
    { length: 256 },
    (_, b) => String.fromCodePoint(printable(b) ? b : 256 + extra++),
  );
}

/**
 * A byte-level BPE tokenizer.json without merges: id b is byte b, so any
 * model of 256 ids gets a tokenizer for the public API.
 */
function bytesTokenizer(): Json {
  const vocab = Object.fromEntries(byteLevelChars().map((char, id) => [char, id]));
  return {
    version: "1.0",
    added_tokens: [],
    normalizer: null,
    pre_tokenizer: {
      type: "ByteLevel",
      add_prefix_space: false,
      trim_offsets: true,
      use_regex: true,
    },
    post_processor: null,
    decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    model: { type: "BPE", vocab, merges: [] },
  };
}

/** A model directory: `config`, `tensors` and the bytes tokenizer. */
async function modelDir(config: Json, tensors: Tensors): Promise<string> {
  const dir = await tempDir("mamba2-test-");
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
  await Deno.writeFile(`${dir}/model.safetensors`, writeSafetensors(tensors));
  await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(bytesTokenizer()));
  return dir;
}

/** The `count` ids `generate` picks greedily after `prompt`, end-of-sequence ids included. */
async function greedyIds(mamba: Mamba, prompt: number[], count: number): Promise<number[]> {
  const ids: number[] = [];
  const generation = mamba.generate(prompt, {
    maxNewTokens: count,
    temperature: 0,
    ignoreEos: true,
  });
  for await (const event of generation) ids.push(event.token);
  return ids;
}

/** A fixture's prompt, full-sequence logits and greedy ids (one row). */
async function expected(dir: string) {
  const file = SafetensorsFile.parse(
    await Deno.readFile(`${dir}/expected.safetensors`),
    `${dir}/expected.safetensors`,
  );
  const prompt = [...file.int32("input_ids")];
  const greedy = [...file.int32("greedy_ids")];
  return {
    prompt,
    logits: file.float32("logits"),
    greedy,
    continuation: greedy.slice(prompt.length),
  };
}

/** The state-spaces (mamba_ssm) config of the tiny-groups2 model. */
const STATE_SPACES_CONFIG = {
  d_model: 64,
  d_intermediate: 0,
  n_layer: 2,
  vocab_size: 256,
  ssm_cfg: { layer: "Mamba2", d_state: 32, headdim: 16, ngroups: 2, chunk_size: 16 },
  attn_layer_idx: [],
  attn_cfg: {},
  rms_norm: true,
  residual_in_fp32: true,
  fused_add_norm: true,
  pad_vocab_size_multiple: 16,
  tie_embeddings: true,
};

Deno.test("Mamba-2 configs: transformers' and state-spaces' layouts, and clear errors", async (t) => {
  const hf = await readJson(`${MAMBA2}/config.json`);
  await t.step("transformers' Mamba2Config", () => {
    const config = parseConfig(hf, "config.json");
    assertEquals(config.mamba2, {
      nHeads: 8,
      headDim: 16,
      nGroups: 2,
      chunkSize: 16,
      dtLimit: [0, Infinity],
    });
    assertEquals([config.dModel, config.dInner, config.dState, config.dConv], [64, 128, 32, 4]);
    assertEquals([config.vocabSize, config.eps, config.tieEmbeddings], [256, 1e-5, true]);
    // transformers unties the head unless the config says otherwise.
    const { tie_word_embeddings: _, ...untied } = hf;
    assertEquals(parseConfig(untied, "config.json").tieEmbeddings, false);
  });
  await t.step("state-spaces' ssm_cfg, with mamba_ssm's defaults", () => {
    const config = parseConfig(STATE_SPACES_CONFIG, "config.json");
    assertEquals(config.mamba2, parseConfig(hf, "config.json").mamba2);
    assertEquals(config.tieEmbeddings, true);
    // Infinity as a string, as some converted configs spell it.
    const limited = parseConfig({
      ...STATE_SPACES_CONFIG,
      ssm_cfg: { ...STATE_SPACES_CONFIG.ssm_cfg, dt_limit: [0.001, "Infinity"] },
    }, "config.json");
    assertEquals(limited.mamba2?.dtLimit, [0.001, Infinity]);
    const defaults = parseConfig({
      d_model: 768,
      n_layer: 24,
      vocab_size: 50277,
      pad_vocab_size_multiple: 16,
      ssm_cfg: { layer: "Mamba2" },
    }, "config.json");
    assertEquals(defaults.mamba2, {
      nHeads: 24,
      headDim: 64,
      nGroups: 1,
      chunkSize: 256,
      dtLimit: [0, Infinity],
    });
    assertEquals([defaults.dState, defaults.dInner, defaults.vocabSize], [128, 1536, 50288]);
  });
  await t.step("errors name the field", () => {
    const cases: [Json, string][] = [
      [{ ...hf, n_groups: 3 }, `"n_groups" 3 must divide the 8 heads`],
      [{ ...hf, num_heads: 7 }, "heads · head_dim"],
      [{ ...hf, time_step_limit: [1, 0] }, `"time_step_limit"`],
      [{ ...STATE_SPACES_CONFIG, d_intermediate: 128 }, `"d_intermediate" 128`],
      [{ ...STATE_SPACES_CONFIG, attn_layer_idx: [1] }, `"attn_layer_idx"`],
      [{ ...STATE_SPACES_CONFIG, ssm_cfg: { layer: "Mamba3" } }, "Mamba3"],
      [
        { ...STATE_SPACES_CONFIG, ssm_cfg: { layer: "Mamba2", norm_before_gate: true } },
        "norm_before_gate",
      ],
    ];
    for (const [raw, fragment] of cases) {
      const error = assertThrows(() => parseConfig(raw, "m/config.json"), ModelFileError);
      assert(error.message.includes("m/config.json"), error.message);
      assert(error.message.includes(fragment), `${error.message} lacks ${fragment}`);
    }
  });
});

Deno.test("Falcon-Mamba config: model_type falcon_mamba and mixer_rms_eps", async () => {
  const raw = await readJson(`${FALCON}/config.json`);
  assertEquals(parseConfig(raw, "config.json").mixerRmsEps, 1e-6);
  assertEquals(parseConfig({ ...raw, model_type: "mamba" }, "config.json").mixerRmsEps, undefined);
  assertThrows(
    () => parseConfig({ ...raw, mixer_rms_eps: -1 }, "config.json"),
    ModelFileError,
    `"mixer_rms_eps" must be a positive number`,
  );
});

Deno.test("Mamba-2 checkpoints: state-spaces names, untied heads, bad shapes", async (t) => {
  const hfTensors = await readTensors(`${MAMBA2}/model.safetensors`);
  const want = await expected(MAMBA2);
  const logitsOf = async (dir: string) => {
    const { config, weights } = await loadCheckpoint(dir);
    const model = new MambaModel(await createBackend("js"), config, weights);
    return await model.forward(model.pool.acquire(), Int32Array.from(want.prompt));
  };
  await t.step("state-spaces' backbone.embedding. with an ssm_cfg config", async () => {
    const { "backbone.embeddings.weight": embedding, ...rest } = hfTensors;
    const dir = await modelDir(STATE_SPACES_CONFIG, {
      "backbone.embedding.weight": embedding,
      ...rest,
    });
    const diff = maxAbsDiff(await logitsOf(dir), want.logits);
    assert(diff <= 1e-4, `max abs diff ${diff}`);
  });
  await t.step("an untied head is read from lm_head.weight", async () => {
    const config = { ...await readJson(`${MAMBA2}/config.json`), tie_word_embeddings: false };
    const head = hfTensors["backbone.embeddings.weight"];
    const dir = await modelDir(config, {
      ...hfTensors,
      "lm_head.weight": { ...head, data: (head.data as Float32Array).slice() },
    });
    const diff = maxAbsDiff(await logitsOf(dir), want.logits);
    assert(diff <= 1e-4, `max abs diff ${diff}`);
    const headless = await modelDir(config, hfTensors);
    await assertRejects(() => loadCheckpoint(headless), ModelFileError, "lm_head.weight");
  });
  await t.step("a tensor of the wrong shape names the sizes", async () => {
    const config = { ...await readJson(`${MAMBA2}/config.json`), n_groups: 4 };
    const dir = await modelDir(config, hfTensors);
    const error = await assertRejects(() => loadCheckpoint(dir), ModelFileError);
    assert(error.message.includes("in_proj.weight"), error.message);
    assert(error.message.includes("n_groups 4"), error.message);
  });
});

/**
 * Where tiny-groups2 loads from: its checkpoint, or a GGUF laid out as
 * llama.cpp's converter writes Mamba-2 (tests/fixtures/gguf/make_mamba2.py,
 * with gguf-py: architecture "mamba2", A itself, grouped norm weights).
 */
const MAMBA2_SOURCES: {
  format: string;
  source: () => Promise<{ path: string; tokenizer?: string }>;
}[] = [
  {
    format: "safetensors",
    source: async () => ({
      path: await modelDir(
        await readJson(`${MAMBA2}/config.json`),
        await readTensors(`${MAMBA2}/model.safetensors`),
      ),
    }),
  },
  {
    // The file has no tokenizer: the same byte-level one, from a directory of its own.
    format: "GGUF",
    source: async () => {
      const tokenizer = await tempDir("mamba2-tokenizer-");
      await Deno.writeTextFile(`${tokenizer}/tokenizer.json`, JSON.stringify(bytesTokenizer()));
      const path = new URL("./fixtures/gguf/mamba2-tiny-groups2.gguf", import.meta.url).pathname;
      return { path, tokenizer };
    },
  },
];

for (const { label, name, options, ignore } of BACKENDS) {
  for (const { format, source } of MAMBA2_SOURCES) {
    Deno.test({
      name: `[${label}] Mamba-2 tiny-groups2 (${format}) through the public API`,
      ignore,
      async fn(t) {
        const { path, tokenizer } = await source();
        const mamba = await loadModel(path, { backend: name, tokenizer, ...options });
        const { prompt, logits, continuation } = await expected(MAMBA2);
        const vocab = mamba.vocabSize;

        await t.step(
          "forward logits within 1e-4 (L = 37: past chunk boundaries, a partial last chunk)",
          async () => {
            const diff = maxAbsDiff(await mamba.forward(prompt), logits);
            assert(diff <= 1e-4, `max abs diff ${diff}`);
          },
        );

        await t.step("generate reproduces greedy_ids", async () => {
          assertEquals(await greedyIds(mamba, prompt, continuation.length), continuation);
        });

        await t.step(
          "step by step (L = 1) and prefills in uneven parts agree with the forward",
          async () => {
            const session = mamba.session();
            for (let i = 0; i < prompt.length; i++) {
              const got = await session.step(prompt[i]);
              const diff = maxAbsDiff(got, logits.subarray(i * vocab, (i + 1) * vocab));
              assert(diff <= 1e-4, `position ${i}: max abs diff ${diff}`);
            }
            const parts = mamba.session();
            let end = 0;
            for (const part of [1, 17, 3, 16]) {
              const got = await parts.prefill(prompt.slice(end, end + part));
              end += part;
              const diff = maxAbsDiff(got, logits.subarray((end - 1) * vocab, end * vocab));
              assert(diff <= 1e-4, `after ${end} ids: max abs diff ${diff}`);
            }
          },
        );

        await t.step("a snapshot resumes where it was taken", async () => {
          const session = mamba.session();
          await session.prefill(prompt);
          const head = await session.greedy(5);
          const resumed = mamba.session(await session.snapshot());
          const rest = await resumed.greedy(continuation.length - 5);
          assertEquals([...head.ids, ...rest.ids], continuation);
          assertEquals((await session.greedy(continuation.length - 5)).ids, rest.ids);
        });

        await t.step("streams decoded together in the engine, joining late", async () => {
          const lengths = [continuation.length, 3, 9, 1, 12, 7];
          const results = lengths.map(async (maxTokens, i) => {
            if (i > 0) await new Promise((resolve) => setTimeout(resolve, i));
            const session = mamba.session();
            const result = await session.decode({
              prompt: prompt.slice(0, prompt.length - (i % 2)),
              sampler: new Sampler({ temperature: 0 }),
              maxTokens,
            });
            session.dispose();
            return result;
          });
          const all = await Promise.all(results);
          for (const [i, result] of all.entries()) {
            if (i % 2 === 0) {
              assertEquals(result, { ids: continuation.slice(0, lengths[i]), stopped: false });
            }
          }
          // Odd streams dropped the prompt's last id: their first pick is the
          // greedy choice after the shorter prompt, then they follow their own way.
          const shorter = prompt.length - 1;
          const firstPick = argmaxRow(logits, shorter - 1, vocab);
          for (const [i, result] of all.entries()) {
            if (i % 2 === 1) assertEquals(result.ids[0], firstPick, `stream ${i}`);
          }
        });

        await t.step("sessions stepped together agree with one alone", async () => {
          const sessions = [mamba.session(), mamba.session(), mamba.session()];
          await Promise.all(sessions.map((s) => s.prefill(prompt)));
          let next = continuation[0];
          for (let i = 1; i < 8; i++) {
            const rows = await Session.stepTogether(sessions, [next, next, next]);
            for (const row of rows) {
              const diff = maxAbsDiff(row, rows[0]);
              // Rows of one batched product may round differently.
              assert(diff <= 1e-5, `rows differ by ${diff}`);
            }
            next = argmaxRow(rows[0], 0, vocab);
            assertEquals(next, continuation[i]);
          }
        });
        mamba.model.backend.dispose();
      },
    });
  }

  Deno.test({
    name: `[${label}] Falcon-Mamba through the public API`,
    ignore,
    async fn() {
      const dir = await modelDir(
        await readJson(`${FALCON}/config.json`),
        await readTensors(`${FALCON}/model.safetensors`),
      );
      const mamba = await loadModel(dir, { backend: name, ...options });
      const { prompt, logits, continuation } = await expected(FALCON);
      const diff = maxAbsDiff(await mamba.forward(prompt), logits);
      assert(diff <= 1e-4, `max abs diff ${diff}`);
      assertEquals(await greedyIds(mamba, prompt, continuation.length), continuation);
      mamba.model.backend.dispose();
    },
  });
}

Deno.test("auto measures js and wasm on a Mamba-2 model's shapes", async () => {
  const config = parseConfig(await readJson(`${MAMBA2}/config.json`), "config.json");
  const candidates = BACKEND_CANDIDATES.filter((c) => c.name !== "webgpu");
  const { backend, report } = await selectBackend("auto", config, {
    candidates,
    cache: null,
    threads: 1,
  });
  assertEquals(report.candidates.map((c) => c.name), ["js", "wasm"]);
  for (const candidate of report.candidates) {
    assert(candidate.totalMs !== undefined && candidate.totalMs > 0, JSON.stringify(candidate));
  }
  backend.dispose();
});

Deno.test("a backend without Mamba-2's operations refuses the model clearly", async () => {
  const { config, weights } = await loadCheckpoint(MAMBA2);
  const backend = await createBackend("js");
  const lacking = Object.assign(Object.create(backend), {
    name: "lacking",
    supports: (op: string) => op !== "ssdScan",
  });
  assertThrows(
    () => new MambaModel(lacking, config, weights),
    Error,
    "The lacking backend cannot run Mamba-2 yet: it lacks the ssdScan operation",
  );
});

Deno.test("weights of the other architecture than the config's are refused", async () => {
  const mamba2 = await loadCheckpoint(MAMBA2);
  const falcon = await loadCheckpoint(FALCON);
  const be = await createBackend("js");
  assertThrows(
    () => new MambaModel(be, mamba2.config, falcon.weights),
    TypeError,
    "not the Mamba-2 blocks the config describes",
  );
  assertThrows(
    () => new MambaModel(be, falcon.config, mamba2.weights),
    TypeError,
    "not the Mamba-1 blocks the config describes",
  );
});

/** The id of the largest logit of row `row`. */
function argmaxRow(logits: Float32Array, row: number, vocab: number): number {
  let best = 0;
  for (let i = 1; i < vocab; i++) {
    if (logits[row * vocab + i] > logits[row * vocab + best]) best = i;
  }
  return best;
}
