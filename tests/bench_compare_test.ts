import { assertAlmostEquals, assertEquals, assertThrows } from "@std/assert";
import { compareTimings, formatChanges, readTimings } from "../bench/compare.ts";
import { formatPeerTable, gpuRows, gpuTables } from "../bench/peers.ts";

const fixtures = new URL("./fixtures/bench/", import.meta.url);
const read = async (name: string) =>
  readTimings(JSON.parse(await Deno.readTextFile(new URL(name, fixtures))), name);

Deno.test("bench compare: ratios, noise ranges and verdicts from the fixtures", async () => {
  const changes = compareTimings(await read("before.json"), await read("after.json"));
  // The failed bench and the bench only in after.json are left out.
  assertEquals(changes.map((change) => change.key), [
    "prefill / wasm: prefill 256 tokens",
    "decode, 1 stream / wasm: decode 32 tokens, 1 stream",
    "first token / wasm: first token after 256 prompt tokens",
  ]);
  const [prefill, decode, firstToken] = changes;
  // Prefill: avg 110 -> 132 ms; min 130 / p75 112 and p75 135 / min 100.
  assertAlmostEquals(prefill.ratio, 132 / 110, 1e-12);
  assertAlmostEquals(prefill.low, 130 / 112, 1e-12);
  assertAlmostEquals(prefill.high, 135 / 100, 1e-12);
  assertEquals(prefill.verdict, "regression");
  // Decode: avg 210 -> 160 ms; p75 170 / min 200 = 0.85 < 0.95.
  assertAlmostEquals(decode.ratio, 160 / 210, 1e-12);
  assertAlmostEquals(decode.high, 170 / 200, 1e-12);
  assertEquals(decode.verdict, "improvement");
  // First token: avg 55 -> 56 ms, range 52/60 .. 59/50 straddles 1.
  assertAlmostEquals(firstToken.ratio, 56 / 55, 1e-12);
  assertEquals(firstToken.verdict, "within noise");
});

Deno.test("bench compare: the threshold widens what counts as noise", async () => {
  const changes = compareTimings(await read("before.json"), await read("after.json"), 0.2);
  // 130 / 112 = 1.16 is not above 1.2; 170 / 200 = 0.85 is not below 0.8.
  assertEquals(changes.map((change) => change.verdict), [
    "within noise",
    "within noise",
    "within noise",
  ]);
});

Deno.test("bench compare: the table has one line per bench", async () => {
  const table = formatChanges(compareTimings(await read("before.json"), await read("after.json")));
  const lines = table.split("\n");
  assertEquals(lines.length, 4);
  assertEquals(lines[1].includes("1.200") && lines[1].endsWith("regression"), true);
  assertEquals(lines[1].includes("1.16–1.35"), true);
});

Deno.test("bench compare: input that is not deno bench output is named in the error", () => {
  assertThrows(() => readTimings({ version: 1 }, "x.json"), Error, "x.json is not deno bench");
  assertThrows(
    () =>
      readTimings(
        { benches: [{ name: "a", results: [{ ok: { n: 1, min: 0, avg: 1, p75: 1 } }] }] },
        "y.json",
      ),
    Error,
    'y.json: bench "a" has no positive "min"',
  );
});

Deno.test("bench peers: the GPU tables divide each round of ours by mamba_ssm's, against the bars, then list ours alone", async () => {
  const text = await gpuTables(new URL("gpu_out", fixtures).pathname);
  const lines = text.split("\n");
  assertEquals(lines[0], "GPU: NVIDIA H200, fp32, 130m shapes, build tree (its rounds in order)");
  const row = (metric: string) => {
    const line = lines.find((candidate) => candidate.startsWith(metric + " "));
    if (!line) throw new Error(`No row "${metric}" in:\n${text}`);
    return line.slice(metric.length).trim().split(/\s{2,}/);
  };
  // Round 1's figures, then round 2's where it has them; the peer; ours / peer over the rounds.
  assertEquals(row("decode 128 tok, 1 stream"), [
    "1400.0 / 1250.0",
    "1000.0",
    "1.25–1.40x",
    "1.3 within the rounds",
  ]);
  assertEquals(row("1 stream, top-k 40 sampled (peer greedy)"), [
    "1200.0",
    "1000.0",
    "1.20x",
    "1.3 not met",
  ]);
  assertEquals(row("decode 128 tok, 16 streams").slice(2), ["1.00–1.10x", "1.0 met"]);
  assertEquals(row("decode 128 tok, 64 streams").slice(2), ["0.90–1.05x", "1.0 within the rounds"]);
  assertEquals(row("decode 128 tok, 256 streams").slice(1), [
    "60000.0",
    "0.90–1.10x",
    "1.0 within the rounds",
  ]);
  assertEquals(row("prefill 2048 tok").slice(2), ["0.90x", "0.9 met"]);
  assertEquals(row("prefill 2048 tok, sessions in flight").slice(2), ["1.50x"]);
  // tree.mamba2.2.json is empty, as a failed run leaves it: one round of Mamba-2.
  assertEquals(row("Mamba-2 decode, 1 stream").slice(0, 3), ["1350.0", "900.0", "1.50x"]);
  assertEquals(row("Mamba-2 decode, 64 streams").slice(2), ["0.96x", "1.0 not met"]);
  assertEquals(row("Mamba-2 prefill 2048 tok").slice(2), ["2.00x", "1.0 met"]);
  // fp32 rows of the SSD kernel only; a shape the peer failed on has no row.
  assertEquals(row("SSD scan 1x2048x24, G elements/s").slice(0, 3), ["8.0", "4.0", "2.00x"]);
  assertEquals(lines.filter((line) => line.startsWith("SSD scan")).length, 1);
  // Our figures without a peer: the first token, the edge server over HTTP, what auto picks.
  assertEquals(lines.slice(14), [
    "first token at 64 streams, median: 48.2 ms / 52 ms",
    "edge server over HTTP, 16 streams: 8000.0 tok/s (first token 110.5 ms)",
    "edge server over HTTP, 64 streams: 20000.0 tok/s (first token 160 ms)",
    "auto picks webgpu:",
    "webgpu: 2.1 ms a round (picked)",
    "wasm: 40.2 ms a round",
  ]);
});

Deno.test("bench peers: a metric without a figure on either side is listed, not guessed", () => {
  const table = gpuRows({ e2e: { decode_b1_tok_per_s_float32: 1000 }, api: [], ours2: [] });
  assertEquals(table.rows, []);
  assertEquals(table.missing.slice(0, 3), [
    "decode 128 tok, 1 stream",
    "1 stream, top-k 40 sampled (peer greedy)",
    "decode 128 tok, 16 streams",
  ]);
  const lines = formatPeerTable("llama.cpp", "mamba wasm", [
    { metric: "prefill 512 tok", ours: [250], peer: 500 },
  ]).split("\n");
  assertEquals(lines.length, 2);
  assertEquals(lines[1].endsWith("0.50x"), true);
});
