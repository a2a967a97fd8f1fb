/**
 * `deno task quantize`: Q8_0 and Q4_0 quantize bit for bit as gguf-py's
 * reference does, every type decodes back within its step, and the GGUF it
 * writes loads as a complete model (F16 of an F16 checkpoint: the HF
 * oracle's logits; its tokenizer: tokenizer.json's ids).
 */

import { assert, assertEquals, assertRejects, assertStringIncludes } from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { dequantize, GGML, GgufFile } from "../src/gguf.ts";
import { quantize, writeGguf } from "../src/gguf_write.ts";
import { loadModel } from "../src/load.ts";
import { quantizeModel } from "../src/quantize.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { maxAbsDiff, otherFloats, SHARED } from "./helpers.ts";
import { WasmBackend } from "../src/backends/wasm.ts";
import { type GpuBuffer, WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { JsBackend } from "../src/backends/js.ts";
import { loadGguf } from "../src/formats.ts";
import { MambaModel } from "../src/model.ts";
import { openSource } from "../src/source.ts";
import { Session } from "../src/session.ts";

const FIXTURES = new URL("./fixtures/gguf/", import.meta.url).pathname;
const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;
const CLI = new URL("../src/quantize.ts", import.meta.url).pathname;

Deno.test("Q8_0 and Q4_0 quantize as gguf-py's reference, bit for bit", async () => {
  const fixture = SafetensorsFile.parse(
    await Deno.readFile(`${FIXTURES}quants.safetensors`),
    "quants.safetensors",
  );
  const rows = fixture.float32("rows");
  for (const [name, type] of [["q8_0", GGML.Q8_0], ["q4_0", GGML.Q4_0]] as const) {
    const info = fixture.info(`${name}.quantized`);
    const expected = fixture.bytes.subarray(info.byteOffset, info.byteOffset + info.byteLength);
    assertEquals(quantize(type, rows), expected, name);
  }
});

Deno.test("every written type decodes back within its quantization step", () => {
  const values = Float32Array.from({ length: 1024 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 7)));
  const amax = Math.max(...values.map(Math.abs));
  const range = amax * 2;
  for (
    const [type, bound] of [
      [GGML.F16, amax * 2 ** -11],
      // Half a step, plus the f16 rounding of the scale (2^-11 of up to 127 steps).
      [GGML.Q8_0, amax / 127 * 0.57],
      [GGML.Q4_0, amax / 8],
      [GGML.Q4_K, range / 15 * 0.6 + range / 63],
    ] as const
  ) {
    const back = dequantize(type, quantize(type, values), values.length);
    const error = maxAbsDiff(back, values);
    assert(error <= bound, `${type}: max error ${error} > ${bound}`);
  }
});

Deno.test("a GGUF header past the writer's first 64 KiB (a real vocabulary) reads back whole", () => {
  // The gpt-neox-20b vocabulary of real checkpoints is about 0.5 MB of metadata.
  const tokens = Array.from({ length: 40_000 }, (_, i) => `token-${i}`);
  const bytes = writeGguf(
    new Map([
      ["general.architecture", { type: "string", value: "mamba" }],
      ["tokenizer.ggml.tokens", { type: "string[]", value: tokens }],
      ["mamba.block_count", { type: "u32", value: 24 }],
      ["mamba.attention.layer_norm_rms_epsilon", { type: "f32", value: 0.5 }],
    ]),
    [{
      name: "w",
      shape: [2, 3],
      type: GGML.F32,
      data: quantize(GGML.F32, new Float32Array(6).fill(2)),
    }],
  );
  const gguf = GgufFile.parse(bytes, "big-header.gguf");
  assertEquals(gguf.metadata.get("tokenizer.ggml.tokens"), tokens);
  assertEquals(gguf.integer("mamba.block_count"), 24);
  assertEquals(gguf.metadata.get("mamba.attention.layer_norm_rms_epsilon"), 0.5);
  assertEquals(gguf.float32("w"), new Float32Array(6).fill(2));
});

Deno.test("quantize writes GGUF that loads as the same model, tokenizer included", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-quantize-test-" });
  try {
    const { bytes, notes } = await quantizeModel(SHAKESPEARE, "f16");
    assertEquals(notes, []);
    await Deno.writeFile(`${dir}/f16.gguf`, bytes);
    const model = await loadModel(`${dir}/f16.gguf`, { backend: "js" });
    // The checkpoint is F16, so an F16 GGUF holds exactly its weights.
    const expected = SafetensorsFile.parse(
      await Deno.readFile(`${SHAKESPEARE}/expected.safetensors`),
      "expected.safetensors",
    );
    const ids = expected.int32("prompt0_ids");
    const logits = expected.float32("prompt0_logits");
    const diff = maxAbsDiff(
      await model.forward(ids),
      logits.subarray(0, ids.length * model.vocabSize),
    );
    assert(diff < 1e-4, `max |Δlogit| ${diff}`);
    const cases = JSON.parse(await Deno.readTextFile(`${SHARED}/fixtures/tokenizer/cases.json`));
    for (const { text, ids: wanted, decoded } of cases["tiny-shakespeare"]) {
      assertEquals(model.tokenizer.encode(text), wanted, JSON.stringify(text));
      assertEquals(model.tokenizer.decode(wanted), decoded, JSON.stringify(text));
    }

    // F32 (for peers that time F32 weights): the same weights, widened.
    const f32 = await quantizeModel(SHAKESPEARE, "f32");
    assertEquals(f32.notes, []);
    assertEquals(GgufFile.parse(f32.bytes, "f32.gguf").info("blk.0.ssm_in.weight").type, GGML.F32);
    await Deno.writeFile(`${dir}/f32.gguf`, f32.bytes);
    const wide = await loadModel(`${dir}/f32.gguf`, { backend: "js" });
    const wideDiff = maxAbsDiff(
      await wide.forward(ids),
      logits.subarray(0, ids.length * model.vocabSize),
    );
    assert(wideDiff < 1e-4, `F32: max |Δlogit| ${wideDiff}`);

    // Quantized: the 16-column dt_proj falls back to F16 with a note per layer.
    const q4 = await quantizeModel(SHAKESPEARE, "q4_0");
    assertEquals(q4.notes.length, model.config.nLayer);
    const gguf = GgufFile.parse(q4.bytes, "q4_0.gguf");
    assertEquals(gguf.info("blk.0.ssm_in.weight").type, GGML.Q4_0);
    assertEquals(gguf.info("token_embd.weight").type, GGML.Q8_0, "the tied output projection");
    assertEquals(gguf.info("blk.0.ssm_dt.weight").type, GGML.F16);
    assertEquals(gguf.info("blk.0.ssm_conv1d.weight").type, GGML.F32);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the quantize command writes the file and notes each F16 fallback; bad flags print usage", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-quantize-cli-" });
  const run = (args: string[]) =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-net", CLI, ...args],
      stdout: "piped",
      stderr: "piped",
    }).output();
  try {
    const out = `${dir}/m.gguf`;
    const written = await run([SHAKESPEARE, out, "--type", "q8_0"]);
    const stderr = new TextDecoder().decode(written.stderr);
    assertEquals(written.code, 0, stderr);
    assertEquals(stderr.match(/^note: blk\.\d+\.ssm_dt\.weight/gm)?.length, 6);
    assertEquals(
      GgufFile.parse(await Deno.readFile(out), out).info("token_embd.weight").type,
      GGML.Q8_0,
    );
    const refused = await run([SHAKESPEARE, out, "--type", "q3_k"]);
    assertEquals(refused.code, 2);
    assert(new TextDecoder().decode(refused.stderr).startsWith("Usage: deno task quantize"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// The wasm backend repacks each block with f32 scales: 40 bytes for Q8_0's 34 (with the sum of
// its values), 20 for Q4_0's 18, 152 for Q4_K's 144 (its 6-bit scales and mins a byte each: 4.75
// bits a weight).
const PACKED = new Map<number, number>([
  [GGML.Q8_0, 40 / 34],
  [GGML.Q4_0, 20 / 18],
  [GGML.Q4_K, 152 / 144],
]);
for (const type of ["q8_0", "q4_0", "q4_k"] as const) {
  Deno.test(`a ${type} GGUF on wasm keeps its blocks and gives the f32 logits of its dequantized weights within 1e-3`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "mamba-quantized-test-" });
    try {
      const { bytes } = await quantizeModel(SHAKESPEARE, type);
      const file = `${dir}/${type}.gguf`;
      await Deno.writeFile(file, bytes);
      // The js backend keeps no blocks: it runs the dequantized weights in f32, the reference.
      await using reference = await loadModel(file, { backend: "js" });
      const expected = SafetensorsFile.parse(
        await Deno.readFile(`${SHAKESPEARE}/expected.safetensors`),
        "expected.safetensors",
      );
      // prompt0's greedy continuation (50 ids): the steps below need more than its 2-id prompt.
      const ids = expected.int32("prompt0_greedy_ids");
      const wantLogits = await reference.forward(ids);
      const wantSteps: Float32Array[] = [];
      const refSession = reference.session();
      await refSession.prefill(ids.subarray(0, 8));
      for (const id of ids.subarray(8, 14)) wantSteps.push(await refSession.step(id));

      // What the wasm memory should hold: Q8_0, Q4_0 and Q4_K tensors as their blocks (a 4-bit
      // file's output projection is Q8_0), the F16 ones (dt_proj, whose rows are not whole
      // blocks) in 16 bits, the others in f32.
      const gguf = GgufFile.parse(bytes, file);
      let blockBytes = 0;
      let f32Bytes = 0;
      let allF32Bytes = 0;
      for (const info of gguf.tensors.values()) {
        const elements = info.dims.reduce((a, b) => a * b, 1);
        const packed = PACKED.get(info.type);
        if (packed !== undefined) blockBytes += info.byteLength * packed;
        else f32Bytes += (info.type === GGML.F16 ? 2 : 4) * elements;
        // in_proj, x_proj and out_proj (dt_proj's 16 columns are not a super-block: F16).
        if (type === "q4_k" && /\.ssm_(in|x|out)\.weight$/.test(info.name)) {
          assertEquals(info.type, GGML.Q4_K, info.name);
          assertEquals(
            info.byteLength * packed! * 8 / elements,
            4.75,
            `${info.name}: bits a weight`,
          );
        }
        allF32Bytes += 4 * elements;
      }
      assert(
        blockBytes + f32Bytes < 0.35 * allF32Bytes,
        `${blockBytes + f32Bytes} of ${allF32Bytes}`,
      );
      for (const threads of [1, 2]) {
        // No warm-up: its runs upload ids and settings, which are not weights.
        await using model = await loadModel(file, { backend: "wasm", threads, warmUp: false });
        // The memory holds the blocks, not f32 matrices.
        const held = (model.model.backend as WasmBackend).copiedBytes;
        assertEquals(held, blockBytes + f32Bytes, `${threads} threads: bytes copied in at load`);
        // Prefill runs the matmul over dequantized tiles, steps the GEMV over the blocks.
        const diff = maxAbsDiff(await model.forward(ids), wantLogits);
        assert(diff < 1e-3, `${threads} threads: forward max |Δlogit| ${diff}`);
        const session = new Session(model.model);
        await session.prefill(ids.subarray(0, 8));
        for (const [i, id] of ids.subarray(8, 14).entries()) {
          const stepDiff = maxAbsDiff(await session.step(id), wantSteps[i]);
          assert(stepDiff < 1e-3, `${threads} threads: step ${i} max |Δlogit| ${stepDiff}`);
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

const gpuAdapter = await navigator.gpu?.requestAdapter();

// The webgpu backend repacks each block with f32 scales, in plain order: 36 bytes for Q8_0's 34, 20
// for Q4_0's 18, 152 for Q4_K's 144.
const GPU_PACKED = new Map<number, number>([
  [GGML.Q8_0, 36 / 34],
  [GGML.Q4_0, 20 / 18],
  [GGML.Q4_K, 152 / 144],
]);

for (const type of ["q8_0", "q4_0", "q4_k"] as const) {
  Deno.test({
    name: `a ${type} GGUF on webgpu keeps its blocks and gives the js backend's logits within 1e-4`,
    ignore: !gpuAdapter,
    fn: async () => {
      const dir = await Deno.makeTempDir({ prefix: "mamba-quantized-gpu-test-" });
      const gpu = await WebGpuBackend.create({ adapter: gpuAdapter! });
      try {
        const { bytes } = await quantizeModel(SHAKESPEARE, type);
        const file = `${type}.gguf`;
        await Deno.writeFile(`${dir}/${file}`, bytes);
        const { config, weights } = await loadGguf(await openSource(dir), file);
        // prompt0's greedy continuation: teacher-forced whole (the tiled matmul), then a prefill
        // of 8 (the GEMV in row groups) and single steps (the decode step's GEMV and scan).
        const ids = SafetensorsFile.parse(
          await Deno.readFile(`${SHAKESPEARE}/expected.safetensors`),
          "expected.safetensors",
        ).int32("prompt0_greedy_ids");
        /** The whole sequence's logits, then the prompt's last ones and each step's. */
        const logitsOf = async (model: MambaModel<unknown>) => {
          const all = [await model.forward(model.pool.acquire(), ids)];
          const session = new Session(model);
          all.push(await session.prefill(ids.subarray(0, 8)));
          for (const id of ids.subarray(8, 14)) all.push(await session.step(id));
          return all;
        };
        // The js backend keeps no blocks: it runs the dequantized weights in f32, the reference.
        const want = await logitsOf(new MambaModel(new JsBackend(), config, weights));

        const kept: GpuBuffer[] = [];
        const uploadBlocks = gpu.uploadQuantizedMatrix.bind(gpu);
        gpu.uploadQuantizedMatrix = (matrix) => {
          const buffer = uploadBlocks(matrix);
          assertEquals(buffer.format, matrix.type, "the format kept");
          kept.push(buffer);
          return buffer;
        };
        const model = new MambaModel(gpu, config, weights);
        // Every block tensor of the file (the embedding and the matrices linear reads) is kept
        // as its repacked blocks (f32 scales), not as f32.
        const blockTensors = [...GgufFile.parse(bytes, file).tensors.values()]
          .filter((info) => GPU_PACKED.has(info.type));
        assertEquals(kept.length, blockTensors.length, "matrices kept as blocks");
        const held = kept.reduce((sum, buffer) => sum + buffer.buffer.size, 0);
        const packed = blockTensors.reduce(
          (sum, info) => sum + Math.ceil((info.byteLength * GPU_PACKED.get(info.type)!) / 16) * 16,
          0,
        );
        assertEquals(held, packed, "GPU bytes of the blocks");
        const f32 = blockTensors.reduce((sum, info) => sum + 4 * info.dims[0] * info.dims[1], 0);
        assert(held < (type === "q8_0" ? 0.3 : 0.2) * f32, `${held} bytes held for ${f32} as f32`);

        const got = await logitsOf(model);
        for (const [i, logits] of got.entries()) {
          const diff = maxAbsDiff(logits, want[i]);
          const what = i === 0 ? "forward" : i === 1 ? "prefill" : `step ${i - 2}`;
          assert(diff < 1e-4, `${what}: max |Δlogit| ${diff}`);
        }
      } finally {
        gpu.dispose();
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

/**
 * The bundled model written as a `type` GGUF and loaded as stored, with its logits on the js
 * backend (which widens 16-bit matrices: the reference): a prefill of 8 ids of prompt0's greedy
 * continuation, then a step for each of the next 12. The file is read as the model is built, so
 * it stays until the result is disposed of.
 */
async function halfGguf(type: "f16" | "bf16") {
  const dir = await Deno.makeTempDir({ prefix: "mamba-half-test-" });
  const remove = () => Deno.remove(dir, { recursive: true });
  try {
    const { bytes } = await quantizeModel(SHAKESPEARE, type);
    await Deno.writeFile(`${dir}/${type}.gguf`, bytes);
    const { config, weights, halfWeights } = await loadGguf(await openSource(dir), `${type}.gguf`);
    assertEquals(halfWeights, type, "the format auto's probe is rounded to");
    const ids = SafetensorsFile.parse(
      await Deno.readFile(`${SHAKESPEARE}/expected.safetensors`),
      "expected.safetensors",
    ).int32("prompt0_greedy_ids").subarray(0, 20);
    const logitsOf = async (model: MambaModel<unknown>) => {
      const session = new Session(model);
      const all = [await session.prefill(ids.subarray(0, 8))];
      for (const id of ids.subarray(8)) all.push(await session.step(id));
      return all;
    };
    const want = await logitsOf(new MambaModel(new JsBackend(), config, weights));
    /** Asserts that `model` gives the reference's logits within 1e-4. */
    const assertLogits = async (model: MambaModel<unknown>, label: string) => {
      (await logitsOf(model)).forEach((logits, i) => {
        const diff = maxAbsDiff(logits, want[i]);
        assert(diff < 1e-4, `${label}: ${i ? `step ${i}` : "prefill"} max |Δlogit| ${diff}`);
      });
    };
    // The matrices `linear` reads, and the embedding, which the tied lm_head shares.
    const { dModel, dInner, dtRank, dState, nLayer, vocabSize } = config;
    const matrixWeights = nLayer *
        (2 * dInner * dModel + (dtRank + 2 * dState) * dInner + dInner * dtRank + dModel * dInner) +
      vocabSize * dModel;
    return { config, weights, assertLogits, matrixWeights, [Symbol.asyncDispose]: remove };
  } catch (error) {
    await remove();
    throw error;
  }
}

for (const type of ["f16", "bf16"] as const) {
  const article = type === "f16" ? "an" : "a";
  Deno.test(`${article} ${type} GGUF on wasm keeps its matrices and embedding in ${type} and gives the js backend's logits within 1e-4`, async () => {
    await using gguf = await halfGguf(type);
    const { config, weights, assertLogits, matrixWeights } = gguf;
    for (const threads of [1, 2]) {
      using wasm = await WasmBackend.create({ threads });
      // The format each matrix is kept in, as the file stores it.
      const formats = new Set<string>();
      const uploadHalf = wasm.uploadHalfMatrix.bind(wasm);
      wasm.uploadHalfMatrix = (matrix) => {
        const kept = uploadHalf(matrix);
        formats.add(kept.format);
        return kept;
      };
      const model = new MambaModel(wasm, config, weights);
      assertEquals([...formats], [type], `${threads} threads: formats kept`);
      // 2 bytes a weight of the matrices; the vectors in f32.
      assertEquals(
        wasm.copiedBytes,
        2 * matrixWeights + 4 * otherFloats(config),
        `${threads} threads: bytes copied in at load`,
      );
      await assertLogits(model, `${threads} threads`);
    }
  });

  Deno.test({
    name:
      `${article} ${type} GGUF on webgpu keeps its matrices and embedding 16-bit and gives the js backend's logits within 1e-4`,
    ignore: !gpuAdapter,
    fn: async () => {
      await using gguf = await halfGguf(type);
      const { config, weights, assertLogits, matrixWeights } = gguf;
      const gpu = await WebGpuBackend.create({ adapter: gpuAdapter! });
      try {
        const kept: GpuBuffer[] = [];
        const uploadHalf = gpu.uploadHalfMatrix.bind(gpu);
        gpu.uploadHalfMatrix = (matrix) => {
          const buffer = uploadHalf(matrix);
          kept.push(buffer);
          return buffer;
        };
        const model = new MambaModel(gpu, config, weights);
        // in_proj, x_proj, dt_proj and out_proj of each layer, and the embedding, in 2 bytes a
        // weight (GPU buffers are whole 16 bytes); a bf16 matrix whose values are all exact f16
        // goes up as f16.
        assertEquals(kept.length, 4 * config.nLayer + 1, "matrices kept 16-bit");
        assertEquals(kept.reduce((sum, { length }) => sum + length, 0), matrixWeights);
        for (const { format, length, buffer } of kept) {
          assert(format === type || format === "f16", format);
          assertEquals(buffer!.size, Math.ceil((2 * length) / 16) * 16, "bytes held");
        }
        await assertLogits(model, "webgpu");
      } finally {
        gpu.dispose();
      }
    },
  });
}

Deno.test("a Mamba-2 model quantizes to llama.cpp's mamba2 layout; its Q8_0 blocks stay blocks on wasm", async () => {
  const mamba2 = `${SHARED}/fixtures/mamba2/tiny-groups2`;
  // As F32, every tensor as tests/fixtures/gguf/make_mamba2.py lays the model out with gguf-py,
  // following llama.cpp's converter: names, dimensions, types and bytes.
  const { bytes } = await quantizeModel(mamba2, "f32");
  const ours = GgufFile.parse(bytes, "ours.gguf");
  const fixture = GgufFile.parse(
    await Deno.readFile(new URL("./fixtures/gguf/mamba2-tiny-groups2.gguf", import.meta.url)),
    "mamba2-tiny-groups2.gguf",
  );
  assertEquals(ours.string("general.architecture"), "mamba2");
  assertEquals([...ours.tensors.keys()].sort(), [...fixture.tensors.keys()].sort());
  for (const [name, info] of fixture.tensors) {
    const mine = ours.info(name);
    assertEquals([mine.dims, mine.type], [info.dims, info.type], name);
    assertEquals(ours.raw(name), fixture.raw(name), name);
  }
  for (const [key, value] of fixture.metadata) {
    if (key.startsWith("mamba2.")) assertEquals(ours.metadata.get(key), value, key);
  }

  const dir = await Deno.makeTempDir({ prefix: "mamba2-quantize-test-" });
  try {
    await Deno.writeFile(`${dir}/q8_0.gguf`, (await quantizeModel(mamba2, "q8_0")).bytes);
    const ids = SafetensorsFile.parse(
      await Deno.readFile(`${mamba2}/expected.safetensors`),
      "expected.safetensors",
    ).int32("input_ids");
    // The js backend runs the dequantized blocks in f32, the reference.
    await using reference = await loadModel(`${dir}/q8_0.gguf`, { backend: "js" });
    const want = await reference.forward(ids);
    // No warm-up: its runs upload ids and settings, which are not weights.
    await using model = await loadModel(`${dir}/q8_0.gguf`, {
      backend: "wasm",
      threads: 2,
      warmUp: false,
    });
    const held = (model.model.backend as WasmBackend).copiedBytes;
    // in_proj [392, 64], out_proj [64, 128] of both layers and the embedding [256, 64] as
    // 40-byte blocks of 32; the vectors in f32: per layer the norm (64), the conv's weights and
    // bias (256 · 4 + 256), dt's bias, A and D (8 each) and the gated norm's weight (128), then
    // the final norm (64).
    const blocks = (2 * (392 * 64 + 64 * 128) + 256 * 64) / 32;
    const vectors = 2 * (64 + 256 * 4 + 256 + 3 * 8 + 128) + 64;
    assertEquals(held, 40 * blocks + 4 * vectors, "bytes copied in at load");
    const diff = maxAbsDiff(await model.forward(ids), want);
    assert(diff < 1e-3, `max |Δlogit| ${diff}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a Q8_0 GGUF whose block holds a non-finite scale is refused at load, naming the tensor", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-bad-scale-test-" });
  try {
    const { bytes } = await quantizeModel(SHAKESPEARE, "q8_0");
    const info = GgufFile.parse(bytes, "q8_0.gguf").info("blk.3.ssm_out.weight");
    bytes.set([0x00, 0x7c], info.byteOffset + 34); // block 1's f16 scale: +Infinity
    await Deno.writeFile(`${dir}/q8_0.gguf`, bytes);
    for (const backend of ["js", "wasm"] as const) {
      const error = await assertRejects(
        () => loadModel(`${dir}/q8_0.gguf`, { backend }),
        ModelFileError,
      );
      assertStringIncludes(error.message, "q8_0.gguf");
      assertStringIncludes(
        error.message,
        `"blk.3.ssm_out.weight" holds a scale of Infinity in block 1`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
