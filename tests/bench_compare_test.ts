import { assertAlmostEquals, assertEquals, assertThrows } from "@std/assert";
import { compareTimings, formatChanges, readTimings } from "../bench/compare.ts";
import { formatPeerTable, gpuRows } from "../bench/peers.ts";

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

Deno.test("bench peers: the GPU table divides our tok/s by mamba_ssm's", async () => {
  const load = async (name: string) => JSON.parse(await Deno.readTextFile(new URL(name, fixtures)));
  const rows = gpuRows(await load("mamba_ssm.json"), await load("api_report.json"));
  assertEquals(rows.map((row) => [row.metric, row.ours, row.peer]), [
    ["prefill 2048 tok", 20000, 80000],
    ["decode 128 tok, 1 stream", 900, 1000],
    ["decode 128 tok, 16 streams", 9900, 9000],
  ]);
  const lines = formatPeerTable("mamba_ssm", "mamba webgpu", rows).split("\n");
  assertEquals(lines.length, 4);
  assertEquals(lines[1].endsWith("0.25x"), true);
  assertEquals(lines[2].endsWith("0.90x"), true);
  assertEquals(lines[3].endsWith("1.10x"), true);
  assertThrows(
    () => gpuRows({}, { streams: [], prefill: { tokens: 2048, tokPerS: 1 } }),
    Error,
    'The mamba_ssm report has no "prefill_2048_tok_per_s_float32"',
  );
});
