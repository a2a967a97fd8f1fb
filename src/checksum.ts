/**
 * CRC-32 (the IEEE polynomial of zip and PNG), for the integrity of
 * snapshots and a model's identity in them.
 *
 * @module
 */

let table: Uint32Array | null = null;

function crcTable(): Uint32Array {
  if (table) return table;
  table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

/**
 * The CRC-32 of `bytes`, continuing from `previous` (the CRC of the bytes
 * before them, 0 for none).
 */
export function crc32(bytes: Uint8Array, previous = 0): number {
  const t = crcTable();
  let c = ~previous;
  for (let i = 0; i < bytes.length; i++) c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/** The CRC-32 of floats' bytes (as the host stores them, little-endian). */
export function crc32Floats(values: Float32Array, previous = 0): number {
  return crc32(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), previous);
}
