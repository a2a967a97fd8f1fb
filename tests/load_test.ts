/**
 * Loading checkpoints: sharded files, URLs and the hub layout over a local
 * HTTP server with an on-disk cache, and a clear error for every kind of bad
 * input (each names the file and the problem).
 */

import { assert, assertEquals, assertRejects, assertStringIncludes } from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { loadCheckpoint, loadModel, WARM_UP_PROMPT } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { SafetensorsFile, writeSafetensors } from "../src/safetensors.ts";
import { JsBackend } from "../src/backends/js.ts";
import type { LoadProgress } from "../src/source.ts";
import { maxAbsDiff, otherFloats, SHARED, tempDir } from "./helpers.ts";
import type { WasmBackend } from "../src/backends/wasm.ts";

const TINY = `${SHARED}/fixtures/hf-oracle/tiny-f32`;
const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;

type Tensors = Parameters<typeof writeSafetensors>[0];

/** The tiny-f32 fixture's tensors, to be altered by a test. */
async function tinyTensors(): Promise<Tensors> {
  const file = SafetensorsFile.parse(await Deno.readFile(`${TINY}/model.safetensors`), "tiny");
  const tensors: Tensors = {};
  for (const [name, info] of file.tensors) {
    tensors[name] = { dtype: "F32", shape: [...info.shape], data: file.float32(name).slice() };
  }
  return tensors;
}

async function tinyConfig(): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(`${TINY}/config.json`));
}

/** Writes a model directory from parts; `weights` may be raw bytes. */
async function modelDir(
  config: Record<string, unknown> | string,
  weights: Tensors | Uint8Array,
): Promise<string> {
  const dir = await tempDir("mamba-load-test-");
  await Deno.writeTextFile(
    `${dir}/config.json`,
    typeof config === "string" ? config : JSON.stringify(config),
  );
  await Deno.writeFile(
    `${dir}/model.safetensors`,
    weights instanceof Uint8Array ? weights : writeSafetensors(weights),
  );
  return dir;
}

async function assertLoadError(dir: string, file: string, fragment: string): Promise<void> {
  const error = await assertRejects(() => loadCheckpoint(dir), ModelFileError);
  assertStringIncludes(error.message, file);
  assertStringIncludes(error.message, fragment);
}

async function tinyLogits(dir: string | URL): Promise<Float32Array> {
  const { config, weights } = await loadCheckpoint(dir);
  const model = new MambaModel(new JsBackend(), config, weights);
  const expected = SafetensorsFile.parse(await Deno.readFile(`${TINY}/expected.safetensors`), "e");
  return await model.forward(model.pool.acquire(), expected.int32("input_ids"));
}

async function tinyExpectedLogits(): Promise<Float32Array> {
  const expected = SafetensorsFile.parse(await Deno.readFile(`${TINY}/expected.safetensors`), "e");
  return expected.float32("logits");
}

Deno.test("a sharded checkpoint loads and matches the oracle", async () => {
  const tensors = await tinyTensors();
  const names = Object.keys(tensors);
  const half = Math.ceil(names.length / 2);
  const dir = await tempDir("mamba-shards-");
  const shards = [names.slice(0, half), names.slice(half)];
  const weightMap: Record<string, string> = {};
  for (const [i, shard] of shards.entries()) {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    await Deno.writeFile(
      `${dir}/${file}`,
      writeSafetensors(Object.fromEntries(shard.map((n) => [n, tensors[n]]))),
    );
    for (const name of shard) weightMap[name] = file;
  }
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(await tinyConfig()));
  await Deno.writeTextFile(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify({ metadata: {}, weight_map: weightMap }),
  );
  assert(maxAbsDiff(await tinyLogits(dir), await tinyExpectedLogits()) <= 1e-4);
});

Deno.test("the original state-spaces config and names load the same model", async () => {
  const tensors = await tinyTensors();
  tensors["backbone.embedding.weight"] = tensors["backbone.embeddings.weight"];
  delete tensors["backbone.embeddings.weight"];
  const config = { d_model: 64, n_layer: 2, vocab_size: 256, ssm_cfg: { d_state: 16 } };
  const dir = await modelDir(config, tensors);
  assert(maxAbsDiff(await tinyLogits(dir), await tinyExpectedLogits()) <= 1e-4);
});

Deno.test("bad input: each problem gets an error naming the file", async (t) => {
  await t.step("missing config.json", async () => {
    const dir = await tempDir();
    await assertLoadError(dir, "config.json", "File not found");
  });
  await t.step("malformed config.json", async () => {
    const dir = await modelDir("{ not json", await tinyTensors());
    await assertLoadError(dir, "config.json", "Not valid JSON");
  });
  await t.step("config field of the wrong type", async () => {
    const dir = await modelDir({ ...await tinyConfig(), hidden_size: "64" }, await tinyTensors());
    await assertLoadError(dir, "config.json", `"hidden_size" must be a positive integer`);
  });
  await t.step("config contradicting the weights' shapes", async () => {
    const dir = await modelDir({ ...await tinyConfig(), state_size: 8 }, await tinyTensors());
    await assertLoadError(dir, "model.safetensors", "but the config implies");
  });
  await t.step("config declaring fewer layers than the weights hold", async () => {
    const dir = await modelDir(
      { ...await tinyConfig(), num_hidden_layers: 1 },
      await tinyTensors(),
    );
    await assertLoadError(dir, "model.safetensors", "more layers than the 1");
  });
  await t.step("config declaring more layers than the weights hold", async () => {
    const dir = await modelDir(
      { ...await tinyConfig(), num_hidden_layers: 3 },
      await tinyTensors(),
    );
    await assertLoadError(dir, "model.safetensors", 'Missing tensor "backbone.layers.2.');
  });
  await t.step("config contradicting the vocabulary size", async () => {
    const dir = await modelDir({ ...await tinyConfig(), vocab_size: 300 }, await tinyTensors());
    await assertLoadError(dir, "model.safetensors", "backbone.embeddings.weight");
  });
  await t.step("missing tensor", async () => {
    const tensors = await tinyTensors();
    delete tensors["backbone.layers.1.mixer.dt_proj.bias"];
    const dir = await modelDir(await tinyConfig(), tensors);
    await assertLoadError(
      dir,
      "model.safetensors",
      'Missing tensor "backbone.layers.1.mixer.dt_proj.bias"',
    );
  });
  await t.step("untied config without lm_head", async () => {
    const dir = await modelDir(
      { ...await tinyConfig(), tie_word_embeddings: false },
      await tinyTensors(),
    );
    await assertLoadError(dir, "model.safetensors", 'Missing tensor "lm_head.weight"');
  });
  await t.step("wrong dtype", async () => {
    const tensors = await tinyTensors();
    const d = tensors["backbone.layers.0.mixer.D"];
    tensors["backbone.layers.0.mixer.D"] = {
      dtype: "I32",
      shape: d.shape,
      data: new Int32Array(d.data.length),
    };
    const dir = await modelDir(await tinyConfig(), tensors);
    await assertLoadError(dir, "model.safetensors", "expected a floating-point dtype");
  });
  await t.step("truncated weights", async () => {
    const bytes = writeSafetensors(await tinyTensors());
    const dir = await modelDir(await tinyConfig(), bytes.subarray(0, bytes.length - 100));
    await assertLoadError(dir, "model.safetensors", "past the end");
  });
  await t.step("header length past the end of the file", async () => {
    const bytes = writeSafetensors(await tinyTensors()).slice(0, 4096);
    new DataView(bytes.buffer).setUint32(0, 100_000, true);
    const dir = await modelDir(await tinyConfig(), bytes);
    await assertLoadError(dir, "model.safetensors", "runs past the end of the file");
  });
  await t.step("a tokenizer option naming a missing tokenizer.json", async () => {
    const dir = await modelDir(await tinyConfig(), await tinyTensors());
    const error = await assertRejects(() => loadModel(dir, { tokenizer: dir }), ModelFileError);
    assertStringIncludes(error.message, "tokenizer.json");
    assertStringIncludes(error.message, "File not found");
  });
});

Deno.test("unknown token ids are refused with a clear error", async () => {
  const model = await loadModel(SHAKESPEARE, { backend: "js" });
  await assertRejects(() => model.forward([1, 2048]), RangeError, "Unknown token id 2048");
  const session = model.session();
  await assertRejects(async () => await session.step(-1), RangeError, "Unknown token id -1");
  await assertRejects(async () => await session.prefill([0.5]), RangeError, "Unknown token id 0.5");
  assertEquals(model.tokenizer.decode([5000]), "", "an id without a token decodes as nothing");
});

/** Serves `root` at `/<prefix><file>` on 127.0.0.1; counts requests. */
function serveDirectory(root: string, prefix: string) {
  const requests: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const path = decodeURIComponent(new URL(req.url).pathname);
    requests.push(`${req.method} ${path}`);
    if (!path.startsWith(prefix) || path.includes("..")) return new Response("no", { status: 404 });
    try {
      const bytes = await Deno.readFile(`${root}/${path.slice(prefix.length)}`);
      return new Response(req.method === "HEAD" ? null : bytes, {
        headers: { "content-length": String(bytes.length) },
      });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
  return { server, requests, origin: `http://127.0.0.1:${server.addr.port}` };
}

Deno.test("loads from an http URL with progress", async () => {
  const { server, origin } = serveDirectory(SHAKESPEARE, "/models/shakespeare/");
  try {
    const progress: LoadProgress[] = [];
    const model = await loadModel(`${origin}/models/shakespeare`, {
      backend: "js",
      onProgress: (p) => progress.push(p),
    });
    assertEquals(model.config.nLayer, 6);
    const last = progress.findLast((p) => p.file === "model.safetensors");
    assertEquals(last?.loaded, (await Deno.stat(`${SHAKESPEARE}/model.safetensors`)).size);
    assertEquals(last?.total, last?.loaded);
  } finally {
    await server.shutdown();
  }
});

Deno.test("an HF repo id loads through the hub layout and then from the cache, offline", async () => {
  const cacheDir = await tempDir("mamba-cache-");
  const { server, origin, requests } = serveDirectory(
    SHAKESPEARE,
    "/demo/shakespeare/resolve/main/",
  );
  const first = await loadModel("demo/shakespeare", {
    backend: "js",
    hfEndpoint: origin,
    cacheDir,
  });
  await server.shutdown();
  assert(requests.some((r) => r === "GET /demo/shakespeare/resolve/main/model.safetensors"));
  const cached = await Deno.readFile(`${cacheDir}/hub/demo--shakespeare/main/model.safetensors`);
  assertEquals(cached.length, (await Deno.stat(`${SHAKESPEARE}/model.safetensors`)).size);

  // The server is gone: the second load must not need it.
  const second = await loadModel("demo/shakespeare", {
    backend: "js",
    hfEndpoint: origin,
    cacheDir,
  });
  const ids = first.tokenizer.encode("ROMEO:");
  assertEquals(await second.forward(ids), await first.forward(ids));
});

Deno.test("a missing file on the server is a clear error", async () => {
  const { server, origin } = serveDirectory(`${SHARED}/fixtures/hf-oracle/tiny-f32`, "/m/");
  try {
    const error = await assertRejects(
      () => loadModel(`${origin}/m/`, { tokenizer: `${origin}/m/` }),
      ModelFileError,
    );
    assertStringIncludes(error.message, `${origin}/m/tokenizer.json`);
    assertStringIncludes(error.message, "404");
  } finally {
    await server.shutdown();
  }
});

Deno.test("auto refuses a config contradicting the weight headers before measuring anything", async (t) => {
  for (
    const [key, value] of [["vocab_size", 10_000_000], ["hidden_size", 1_000_000_000]] as const
  ) {
    await t.step(`${key} ${value}`, async () => {
      // Without "expand", only the weights can contradict the config.
      const config = { ...await tinyConfig(), expand: undefined, [key]: value };
      const dir = await modelDir(config, await tinyTensors());
      const start = performance.now();
      const error = await assertRejects(
        () => loadModel(dir, { backendCache: null }),
        ModelFileError,
      );
      assertStringIncludes(error.message, "model.safetensors");
      assertStringIncludes(error.message, "but the config implies");
      const ms = performance.now() - start;
      assert(ms < 2000, `refusing took ${ms.toFixed(0)} ms`);
    });
  }
});

Deno.test("a weight holding NaN or Infinity is refused at load, naming the tensor", async () => {
  for (const bad of [NaN, Infinity, -Infinity]) {
    const tensors = await tinyTensors();
    tensors["backbone.layers.1.mixer.x_proj.weight"].data[7] = bad;
    const dir = await modelDir(await tinyConfig(), tensors);
    await assertLoadError(
      dir,
      "model.safetensors",
      `Tensor "backbone.layers.1.mixer.x_proj.weight" holds ${bad} at index 7`,
    );
  }
  const tensors = await tinyTensors();
  tensors["backbone.layers.0.mixer.A_log"].data[0] = 100;
  await assertLoadError(
    await modelDir(await tinyConfig(), tensors),
    "model.safetensors",
    "backbone.layers.0.mixer.A_log",
  );
});

/**
 * tiny-f32's 256-row model beside a tokenizer that knows only ids 0 to 9,
 * without 5: generation must pick only ids the tokenizer has rows for.
 */
async function smallTokenizerDir(): Promise<string> {
  const dir = await tempDir("mamba-holes-");
  await Deno.copyFile(`${TINY}/config.json`, `${dir}/config.json`);
  await Deno.copyFile(`${TINY}/model.safetensors`, `${dir}/model.safetensors`);
  const json = JSON.parse(await Deno.readTextFile(`${SHAKESPEARE}/tokenizer.json`));
  json.model.vocab = Object.fromEntries(
    Object.entries(json.model.vocab as Record<string, number>).filter(([, id]) =>
      id < 10 && id !== 5
    ),
  );
  json.model.merges = [];
  json.added_tokens = [];
  await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(json));
  return dir;
}

Deno.test("generation never ends on an id the tokenizer lacks, greedy or sampled", async () => {
  const model = await loadModel(await smallTokenizerDir(), { backend: "js" });
  assertEquals(model.tokenizer.vocabSize, 10);
  assertEquals(model.vocabSize, 256);
  for (const options of [{ temperature: 0 }, { temperature: 1.5, seed: 7 }]) {
    const ids: number[] = [];
    let text = "";
    for await (
      const event of model.generate([1, 2, 3], { ...options, maxNewTokens: 40, ignoreEos: true })
    ) {
      ids.push(event.token);
      text += event.text;
    }
    assertEquals(ids.length, 40);
    assert(ids.every((id) => id < 10), `picked ${ids}`);
    assertEquals(text, model.tokenizer.decode(ids));
  }
});

Deno.test("session.step takes any row of the model and refuses ids past them at the call", async () => {
  const model = await loadModel(await smallTokenizerDir(), { backend: "js" });
  const session = model.session();
  await session.prefill([1, 2]);
  // Row 200 has no token; the model still has a row for it.
  await session.step(200);
  let count = 0;
  for await (
    const _ of model.generate([], { session, maxNewTokens: 5, temperature: 0, ignoreEos: true })
  ) count++;
  assertEquals(count, 5);
  await assertRejects(async () => await session.step(256), RangeError, "Unknown token id 256");
});

Deno.test("an F16 checkpoint on wasm keeps its matrices and embedding 16-bit where the file was read", async () => {
  for (const threads of [1, 2]) {
    // No warm-up: its runs upload ids and settings, which are not weights.
    const mamba = await loadModel(SHAKESPEARE, { backend: "wasm", threads, warmUp: false });
    try {
      // Only the vectors (norms, conv, biases, A, D), widened to f32, were copied in: the
      // matrices and the embedding (shared by the tied lm_head) are the file's bytes.
      const backend = mamba.model.backend as WasmBackend;
      assertEquals(backend.copiedBytes, 4 * otherFloats(mamba.config), `${threads} threads`);
      const expected = SafetensorsFile.parse(
        await Deno.readFile(`${SHAKESPEARE}/expected.safetensors`),
        "expected.safetensors",
      );
      const logits = await mamba.forward(expected.int32("prompt0_greedy_ids"));
      const diff = maxAbsDiff(logits, expected.float32("prompt0_logits"));
      assert(diff <= 1e-3, `${threads} threads: max |Δlogit| ${diff}`);
    } finally {
      mamba.dispose();
    }
  }
});

Deno.test("a 16-bit weight holding NaN or Infinity is refused at load, naming the tensor", async () => {
  for (const dtype of ["F16", "BF16"] as const) {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const tensors = await tinyTensors();
      for (const tensor of Object.values(tensors)) tensor.dtype = dtype;
      tensors["backbone.layers.1.mixer.x_proj.weight"].data[7] = bad;
      const dir = await modelDir(await tinyConfig(), tensors);
      for (const backend of ["js", "wasm"] as const) {
        const error = await assertRejects(() => loadModel(dir, { backend }), ModelFileError);
        assertStringIncludes(error.message, "model.safetensors");
        assertStringIncludes(
          error.message,
          `Tensor "backbone.layers.1.mixer.x_proj.weight" holds ${bad} at index 7`,
        );
      }
    }
  }
});

Deno.test("the warm-up runs a prefill and a decode step, and leaves no sequence behind", async () => {
  const mamba = await loadModel(SHAKESPEARE, { backend: "wasm", threads: 2, warmUp: false });
  try {
    const backend = mamba.model.backend as WasmBackend;
    // The lengths of the scans the model asks for (the backend's own calls to itself not counted).
    const scans: number[] = [];
    const selectiveScan = backend.selectiveScan.bind(backend);
    let depth = 0;
    backend.selectiveScan = (args) => {
      if (depth++ === 0) scans.push(args.len);
      try {
        selectiveScan(args);
      } finally {
        depth--;
      }
    };
    await mamba.warmUp();
    const layers = mamba.config.nLayer;
    assertEquals(scans.filter((len) => len === WARM_UP_PROMPT).length, layers, "prefill scans");
    assert(scans.filter((len) => len === 1).length >= layers, "decode step scans");
    await new Promise((resolve) => setTimeout(resolve, 0)); // A session gives its slot back after its calls.
    assertEquals(mamba.model.pool.used, 0);
  } finally {
    mamba.dispose();
  }
});
