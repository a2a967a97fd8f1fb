/**
 * GGUF: dequantization bit for bit against gguf-py's reference, GGUF files
 * written by llama.cpp's converter giving the oracle's logits, the tokenizer
 * built from the file's metadata encoding like tokenizer.json, and a clear
 * error for every kind of malformed file.
 */

import { assert, assertEquals, assertStringIncludes, assertThrows } from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { dequantize, GGML, GgufFile } from "../src/gguf.ts";
import { ggufConfig, ggufTokenizer } from "../src/gguf_model.ts";
import type { MatrixBlocks } from "../src/dispatch.ts";
import { loadGguf, readGguf, singleFile } from "../src/formats.ts";
import { quantizeModel, type QuantizeType } from "../src/quantize.ts";
import { type GgufEntry, writeGguf } from "../src/gguf_write.ts";
import { openSource } from "../src/source.ts";
import { BLOCK_ELEMENTS, dequantizeMatrix, isHalf, quantizedMatrix } from "../src/quant.ts";
import { loadModel } from "../src/load.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { maxAbsDiff, oracleDiff, SHARED } from "./helpers.ts";
import type { Backend } from "../src/backend.ts";
import { JsBackend } from "../src/backends/js.ts";
import { WasmBackend } from "../src/backends/wasm.ts";
import { WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { MambaModel } from "../src/model.ts";

const FIXTURES = new URL("./fixtures/gguf/", import.meta.url).pathname;

Deno.test("dequantization equals gguf-py's bit for bit", async () => {
  const fixture = SafetensorsFile.parse(
    await Deno.readFile(`${FIXTURES}quants.safetensors`),
    "quants.safetensors",
  );
  for (const [name, type] of Object.entries(GGML)) {
    if (type === GGML.F32) continue;
    const key = name.toLowerCase();
    const info = fixture.info(`${key}.blocks`);
    const blocks = fixture.bytes.subarray(info.byteOffset, info.byteOffset + info.byteLength);
    const expected = fixture.float32(`${key}.values`);
    const actual = dequantize(type, blocks, expected.length);
    assertEquals(
      new Uint32Array(actual.buffer),
      new Uint32Array(expected.slice().buffer),
      `${name} differs from gguf-py`,
    );
  }
});

Deno.test("blocks kept in memory dequantize as gguf-py's, bit for bit", async () => {
  const fixture = SafetensorsFile.parse(
    await Deno.readFile(`${FIXTURES}quants.safetensors`),
    "quants.safetensors",
  );
  for (const type of ["q8_0", "q4_0", "q4_k"] as const) {
    const info = fixture.info(`${type}.blocks`);
    const blocks = fixture.bytes.subarray(info.byteOffset, info.byteOffset + info.byteLength);
    const expected = fixture.float32(`${type}.values`).slice();
    const cols = BLOCK_ELEMENTS[type];
    const matrix = quantizedMatrix(type, expected.length / cols, cols, blocks, type);
    assertEquals(
      new Uint32Array(dequantizeMatrix(matrix).buffer),
      new Uint32Array(expected.buffer),
    );
  }
  const infinite = Uint8Array.of(0x00, 0x7c, ...new Array(16).fill(0));
  assertThrows(() => quantizedMatrix("q4_0", 1, 32, infinite, "w"), RangeError, "Infinity");
  // Q4_K: its rows whole super-blocks of 256, its bytes 144 a super-block, d and dmin finite.
  const q4k = new Uint8Array(144);
  assertThrows(
    () => quantizedMatrix("q4_k", 1, 128, q4k, 'Tensor "w"'),
    RangeError,
    `Tensor "w" has rows of 128, not a multiple of Q4_K's block of 256`,
  );
  assertThrows(
    () => quantizedMatrix("q4_k", 2, 256, q4k, "w"),
    RangeError,
    "w needs 288 bytes of Q4_K blocks, got 144",
  );
  const nanMin = q4k.slice();
  nanMin.set([0x00, 0x7e], 2); // dmin: an f16 NaN
  assertThrows(
    () => quantizedMatrix("q4_k", 1, 256, nanMin, "w"),
    RangeError,
    "w holds a min scale of NaN in block 0",
  );
});

for (
  const [gguf, oracleCase] of [
    ["tiny-f32.gguf", "tiny-f32"],
    ["odd-bf16-f16.gguf", "odd-bf16"],
  ]
) {
  Deno.test(`${gguf} (made by make-gguf.sh) gives the oracle's logits within 1e-4`, async () => {
    const model = await loadModel(`${FIXTURES}${gguf}`, { backend: "js" });
    const diff = await oracleDiff(model, oracleCase);
    assert(diff < 1e-4, `max |Δlogit| ${diff}`);
    assert(model.hasTokenizer);
  });
}

Deno.test("the GGUF tokenizer encodes like tokenizer.json", async () => {
  const gguf = GgufFile.parse(
    await Deno.readFile(`${SHARED}/peers/llama.cpp/ggml-vocab-gpt-neox.gguf`),
    "ggml-vocab-gpt-neox.gguf",
  );
  const tokenizer = ggufTokenizer(gguf);
  const cases = JSON.parse(await Deno.readTextFile(`${SHARED}/fixtures/tokenizer/cases.json`));
  for (const { text, ids, decoded } of cases["gpt-neox-20b"]) {
    assertEquals(tokenizer.encode(text), ids, JSON.stringify(text));
    assertEquals(tokenizer.decode(ids), decoded, JSON.stringify(text));
  }
  assertEquals(tokenizer.eosTokenId, 0);
});

/** A minimal valid GGUF: one metadata string, one F32 tensor [2, 32]. */
function smallGguf(
  { version = 3, alignment, type = GGML.F32, offset = 0, dims = [32, 2] }: {
    version?: number;
    alignment?: number;
    type?: number;
    offset?: number;
    dims?: number[];
  } = {},
): Uint8Array {
  const parts: number[] = [];
  const u32 = (v: number) => parts.push(v & 255, (v >> 8) & 255, (v >> 16) & 255, v >>> 24);
  const u64 = (v: number) => (u32(v % 2 ** 32), u32(Math.floor(v / 2 ** 32)));
  const string = (s: string) => {
    const bytes = new TextEncoder().encode(s);
    u64(bytes.length);
    parts.push(...bytes);
  };
  parts.push(..."GGUF".split("").map((c) => c.charCodeAt(0)));
  u32(version);
  u64(1); // tensors
  u64(alignment === undefined ? 1 : 2);
  string("general.architecture");
  u32(8);
  string("mamba");
  if (alignment !== undefined) {
    string("general.alignment");
    u32(4);
    u32(alignment);
  }
  string("w");
  u32(dims.length);
  for (const d of dims) u64(d);
  u32(type);
  u64(offset);
  const align = alignment ?? 32;
  while (parts.length % align) parts.push(0);
  for (let i = 0; i < 64 * 4; i++) parts.push(0);
  return Uint8Array.from(parts);
}

Deno.test("bad GGUF files get an error naming the file and the field", async (t) => {
  const cases: [string, Uint8Array, string][] = [
    ["wrong magic", new TextEncoder().encode("GGML...."), "magic"],
    ["version 1", smallGguf({ version: 1 }), "version 1"],
    ["truncated header", smallGguf().subarray(0, 40), "more than fit"],
    ["truncated tensor info", smallGguf().subarray(0, 90), "Ends inside"],
    ["alignment not a power of two", smallGguf({ alignment: 24 }), "general.alignment"],
    ["unknown type", smallGguf({ type: 99 }), "unknown ggml type 99"],
    ["offset past the data", smallGguf({ offset: 1024 }), "needs bytes 1024"],
    ["unaligned offset", smallGguf({ offset: 4 }), "not a multiple of the alignment"],
    ["row not a multiple of the block", smallGguf({ type: GGML.Q8_0, dims: [16, 2] }), "block"],
    ["too many dimensions", smallGguf({ dims: [32, 1, 1, 1, 1] }), "5 dimensions"],
  ];
  for (const [name, bytes, fragment] of cases) {
    await t.step(name, () => {
      const error = assertThrows(() => GgufFile.parse(bytes, "bad.gguf"), ModelFileError);
      assertStringIncludes(error.message, "bad.gguf");
      assertStringIncludes(error.message, fragment);
    });
  }
  await t.step("a type without a dequantizer names it", () => {
    const gguf = GgufFile.parse(smallGguf({ type: 13, dims: [256, 1] }), "bad.gguf");
    const error = assertThrows(() => gguf.float32("w"), ModelFileError);
    assertStringIncludes(error.message, "Q5_K");
  });
  await t.step("the default alignment and a valid file parse", () => {
    const gguf = GgufFile.parse(smallGguf(), "ok.gguf");
    assertEquals(gguf.alignment, 32);
    assertEquals(gguf.info("w").shape, [2, 32]);
    assertEquals(gguf.float32("w").length, 64);
  });
  await t.step("an implausible or malformed epsilon is named", async () => {
    const epsKey = "mamba.attention.layer_norm_rms_epsilon";
    for (
      const [eps, fragment] of [[0.5, "0.5 is implausible"], [-1, "must be a positive number"]]
    ) {
      const gguf = GgufFile.parse(await Deno.readFile(`${FIXTURES}tiny-f32.gguf`), "eps.gguf");
      gguf.metadata.set(epsKey, eps);
      const error = assertThrows(() => ggufConfig(gguf), ModelFileError);
      assertStringIncludes(error.message, "eps.gguf");
      assertStringIncludes(error.message, `Metadata "${epsKey}" ${fragment}`);
    }
  });
  await t.step("another architecture is named", () => {
    const gguf = GgufFile.parse(smallGguf(), "arch.gguf");
    gguf.metadata.set("general.architecture", "llama");
    const error = assertThrows(() => ggufConfig(gguf), ModelFileError);
    assertStringIncludes(error.message, `"llama"`);
  });
});

Deno.test("a .gguf source: a path, a URL or a hub file", async (t) => {
  await t.step("where each form points", () => {
    assertEquals(singleFile("models/m.gguf", ".gguf"), { dir: "models", name: "m.gguf" });
    assertEquals(singleFile("m.GGUF", ".gguf"), { dir: ".", name: "m.GGUF" });
    assertEquals(singleFile("/m.gguf", ".gguf"), { dir: "/", name: "m.gguf" });
    assertEquals(singleFile("owner/repo/m.gguf", ".gguf"), { dir: "owner/repo", name: "m.gguf" });
    assertEquals(singleFile("owner/repo", ".gguf"), null);
    assertEquals(singleFile("https://host/a/b%20c.gguf?download=1", ".gguf"), {
      dir: new URL("https://host/a/"),
      name: "b c.gguf",
    });
    assertEquals(singleFile(new URL("https://host/a/m.gguf"), ".gguf"), {
      dir: new URL("https://host/a/"),
      name: "m.gguf",
    });
  });
  await t.step("over http, the one file is the whole model", async () => {
    const requests: string[] = [];
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      async (req) => {
        const path = new URL(req.url).pathname;
        requests.push(path);
        if (path !== "/files/tiny-f32.gguf") return new Response("not found", { status: 404 });
        const bytes = await Deno.readFile(`${FIXTURES}tiny-f32.gguf`);
        return new Response(bytes, { headers: { "content-length": String(bytes.length) } });
      },
    );
    try {
      const model = await loadModel(`http://127.0.0.1:${server.addr.port}/files/tiny-f32.gguf`, {
        backend: "js",
      });
      assertEquals(model.vocabSize, 256);
      assertEquals(requests, ["/files/tiny-f32.gguf"]);
      assert((await oracleDiff(model, "tiny-f32")) < 1e-4);
    } finally {
      await server.shutdown();
    }
  });
  await t.step(
    "from the hub, the file goes to the cache and is read from there, also offline",
    async () => {
      const requests: string[] = [];
      const bytes = await Deno.readFile(`${FIXTURES}odd-bf16-f16.gguf`);
      const server = Deno.serve(
        { hostname: "127.0.0.1", port: 0, onListen: () => {} },
        (req) => {
          const path = new URL(req.url).pathname;
          requests.push(`${req.method} ${path}`);
          if (path !== "/owner/repo/resolve/main/m.gguf") {
            return new Response("not found", { status: 404 });
          }
          return new Response(bytes, { headers: { "content-length": String(bytes.length) } });
        },
      );
      const cacheDir = await Deno.makeTempDir({ prefix: "mamba-gguf-hub-" });
      const options = { hfEndpoint: `http://127.0.0.1:${server.addr.port}`, cacheDir };
      try {
        const model = await loadModel("owner/repo/m.gguf", { ...options, backend: "js" });
        assert((await oracleDiff(model, "odd-bf16")) < 1e-4);
        assertEquals(requests, ["GET /owner/repo/resolve/main/m.gguf"]);
        const cached = `${cacheDir}/hub/owner--repo/main/m.gguf`;
        assertEquals(await Deno.readFile(cached), bytes);
        await server.shutdown();
        const offline = await loadModel("owner/repo/m.gguf", { ...options, backend: "js" });
        assert((await oracleDiff(offline, "odd-bf16")) < 1e-4);
        assertEquals(requests.length, 1);
      } finally {
        await server.shutdown().catch(() => {});
        await Deno.remove(cacheDir, { recursive: true });
      }
    },
  );
});

Deno.test("a GGUF tells auto which matrices it keeps as blocks", async () => {
  const shakespeare = `${SHARED}/models/tiny-shakespeare`;
  const dir = await Deno.makeTempDir({ prefix: "mamba-gguf-blocks-" });
  try {
    const expected: Record<string, MatrixBlocks> = {
      f16: { layers: null, head: null },
      q8_0: { layers: "q8_0", head: "q8_0" },
      // A 4-bit file keeps its output (the tied embedding) at 8 bits, as llama-quantize does.
      q4_0: { layers: "q4_0", head: "q8_0" },
      q4_k: { layers: "q4_k", head: "q8_0" },
    };
    for (const [type, blocks] of Object.entries(expected)) {
      const { bytes } = await quantizeModel(shakespeare, type as QuantizeType);
      await Deno.writeFile(`${dir}/${type}.gguf`, bytes);
      const loaded = await loadGguf(await openSource(dir), `${type}.gguf`);
      assertEquals(loaded.matrixBlocks, blocks, type);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a local GGUF's header is read first, past the first MiB where it must, and each tensor as asked", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-gguf-ranges-" });
  try {
    // A 3 MiB description puts the tensor data past the first MiB that readHead gives, and an
    // 8 MiB tensor past the 4 MiB of the second try.
    const values = Float32Array.from({ length: 2048 * 1024 }, (_, i) => (i % 1000) / 7);
    const metadata = new Map<string, GgufEntry>([
      ["general.architecture", { type: "string", value: "mamba" }],
      ["general.description", { type: "string", value: "x".repeat(3 << 20) }],
    ]);
    const bytes = writeGguf(metadata, [{
      name: "w",
      shape: [2048, 1024],
      type: GGML.F32,
      data: new Uint8Array(values.buffer),
    }]);
    await Deno.writeFile(`${dir}/big.gguf`, bytes);
    const gguf = await readGguf(await openSource(dir), "big.gguf");
    // The first MiB did not hold the header; the second try's 4 MiB did, and are all it keeps.
    assertEquals(gguf.bytes.length, 4 << 20);
    assertEquals((gguf.metadata.get("general.description") as string).length, 3 << 20);
    assert(gguf.isRead("w"));
    const first = gguf.float32("w");
    const again = gguf.float32("w");
    assertEquals(first, values);
    assert(first.buffer !== again.buffer, "read anew, into an array of its own");
    assertEquals(first.buffer.byteLength, 8 << 20);
    // The file shrinks after its header was read: the tensor's read names the file.
    await Deno.truncate(`${dir}/big.gguf`, 5 << 20);
    const error = assertThrows(() => gguf.raw("w"), ModelFileError);
    assertStringIncludes(error.message, "big.gguf");
    assertStringIncludes(error.message, "Ends at byte");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a local GGUF's 16-bit matrices are read from the file as the backend takes them, never held", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-gguf-halves-" });
  try {
    const { bytes } = await quantizeModel(`${SHARED}/models/tiny-shakespeare`, "f16");
    await Deno.writeFile(`${dir}/f16.gguf`, bytes);
    const { config, weights } = await loadGguf(await openSource(dir), "f16.gguf");
    // The last layer's in_proj lies past the first MiB (6.5 MB in all), which held the header.
    const inProj = weights.layers.at(-1)!.inProj;
    assert(isHalf(inProj), "in_proj is kept in f16");
    const { dModel, dInner } = config;
    const first = inProj.halves;
    const again = inProj.halves;
    assert(first.buffer !== again.buffer, "read anew, into an array of its own");
    assertEquals(first.buffer.byteLength, 2 * 2 * dInner * dModel);
    assertEquals(first, again);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const gpuAdapter = await navigator.gpu?.requestAdapter();

Deno.test("a Mamba-2 GGUF's F16 matrices stay 16-bit on wasm and webgpu, with the js backend's logits within 1e-4", async () => {
  const { config, weights } = await loadGguf(
    await openSource(FIXTURES),
    "mamba2-tiny-groups2-f16.gguf",
  );
  assert(config.mamba2, "a Mamba-2 config");
  const ids = SafetensorsFile.parse(
    await Deno.readFile(`${SHARED}/fixtures/mamba2/tiny-groups2/expected.safetensors`),
    "expected.safetensors",
  ).int32("input_ids");
  const logitsOf = async (backend: Backend<unknown>) => {
    const model = new MambaModel(backend, config, weights);
    const slot = model.pool.acquire();
    try {
      return await model.forward(slot, ids);
    } finally {
      model.pool.release(slot);
    }
  };
  const want = await logitsOf(new JsBackend());
  const backends: [string, () => Promise<Backend<unknown>>][] = [
    ["wasm", () => WasmBackend.create({ threads: 2 }) as Promise<Backend<unknown>>],
  ];
  if (gpuAdapter) {
    backends.push(["webgpu", () => WebGpuBackend.create({ adapter: gpuAdapter })]);
  }
  for (const [label, create] of backends) {
    const backend = await create();
    try {
      // in_proj and out_proj of both layers, and the embedding (the tied head).
      let kept = 0;
      const uploadHalf = backend.uploadHalfMatrix.bind(backend);
      backend.uploadHalfMatrix = (matrix) => {
        const buffer = uploadHalf(matrix);
        if (buffer !== null) kept++;
        return buffer;
      };
      const diff = maxAbsDiff(await logitsOf(backend), want);
      assertEquals(kept, 2 * config.nLayer + 1, `${label}: matrices kept 16-bit`);
      assert(diff <= 1e-4, `${label}: max |Δlogit| ${diff}`);
    } finally {
      backend.dispose?.();
    }
  }
});
