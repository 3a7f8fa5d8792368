// Ogg pages for Opus (RFC 3533, RFC 7845): the writer that wraps the browser's Opus packets
// (WebCodecs AudioEncoder) for the server's sphn reader, and the reader that takes the packets
// out of the server's pages for the browser's AudioDecoder. Small enough to own (module
// docstring of docs/serving.md, "The web page").

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc >>> 0;
}

export const FLAG_CONTINUED = 1;
export const FLAG_BOS = 2;
export const FLAG_EOS = 4;

// One page holding one whole packet (< 65025 bytes); granule: 48 kHz samples so far.
export function oggPage(packet, { granule = 0, serial = 0, sequence = 0, flags = 0 } = {}) {
  if (packet.length >= 255 * 255) throw new Error(`packet of ${packet.length} bytes`);
  const lacing = [];
  let left = packet.length;
  while (left >= 255) {
    lacing.push(255);
    left -= 255;
  }
  lacing.push(left);
  const page = new Uint8Array(27 + lacing.length + packet.length);
  const view = new DataView(page.buffer);
  page.set([0x4f, 0x67, 0x67, 0x53], 0); // "OggS"
  page[4] = 0;
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  view.setUint32(22, 0, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  page.set(packet, 27 + lacing.length);
  view.setUint32(22, oggCrc(page), true);
  return page;
}

const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));

// OpusHead (RFC 7845 5.1): version 1, mono, pre-skip, the input rate, gain 0, mapping 0.
export function opusHead(sampleRate, preSkip = 312, channels = 1) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(ascii("OpusHead"), 0);
  head[8] = 1;
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, sampleRate, true);
  view.setInt16(16, 0, true);
  head[18] = 0;
  return head;
}

// OpusTags (RFC 7845 5.2): a vendor string, no comments.
export function opusTags(vendor = "moshi-ttt web page") {
  const v = ascii(vendor);
  const tags = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(ascii("OpusTags"), 0);
  view.setUint32(8, v.length, true);
  tags.set(v, 12);
  view.setUint32(12 + v.length, 0, true);
  return tags;
}

// Writes an Ogg/Opus stream page by page: headers() first, then packet(opus, samples48k).
export class OggOpusWriter {
  constructor(sampleRate, serial = (Math.random() * 2 ** 32) >>> 0) {
    this.sampleRate = sampleRate;
    this.serial = serial;
    this.sequence = 0;
    this.granule = 0;
  }

  _page(packet, flags) {
    return oggPage(packet, {
      granule: this.granule,
      serial: this.serial,
      sequence: this.sequence++,
      flags,
    });
  }

  headers() {
    return [this._page(opusHead(this.sampleRate), FLAG_BOS), this._page(opusTags(), 0)];
  }

  // samples48k: the packet's duration in 48 kHz samples (Ogg/Opus granules are always 48 kHz)
  packet(opus, samples48k) {
    this.granule += samples48k;
    return this._page(opus, 0);
  }
}

// Takes Ogg bytes in any pieces, gives the whole packets they complete.
export class OggReader {
  constructor(maxBuffered = 1 << 20) {
    this.buffer = new Uint8Array(0);
    this.partial = [];
    this.maxBuffered = maxBuffered;
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer, 0);
    joined.set(bytes, this.buffer.length);
    this.buffer = joined;
    const packets = [];
    let at = 0;
    for (;;) {
      const buf = this.buffer;
      if (buf.length - at < 27) break;
      if (buf[at] !== 0x4f || buf[at + 1] !== 0x67 || buf[at + 2] !== 0x67 || buf[at + 3] !== 0x53) {
        throw new Error("not an Ogg page");
      }
      const segments = buf[at + 26];
      if (buf.length - at < 27 + segments) break;
      let size = 0;
      for (let i = 0; i < segments; i++) size += buf[at + 27 + i];
      const start = at + 27 + segments;
      if (buf.length < start + size) break;
      if ((buf[at + 5] & FLAG_CONTINUED) === 0) this.partial = [];
      let offset = start;
      for (let i = 0; i < segments; i++) {
        const lace = buf[at + 27 + i];
        this.partial.push(buf.subarray(offset, offset + lace));
        offset += lace;
        if (lace < 255) {
          const total = this.partial.reduce((n, p) => n + p.length, 0);
          const packet = new Uint8Array(total);
          let o = 0;
          for (const p of this.partial) {
            packet.set(p, o);
            o += p.length;
          }
          packets.push(packet);
          this.partial = [];
        }
      }
      at = start + size;
    }
    this.buffer = this.buffer.slice(at);
    if (this.buffer.length > this.maxBuffered) throw new Error("Ogg page too large");
    return packets;
  }
}

export function isOpusHeader(packet) {
  if (packet.length < 8) return false;
  const magic = String.fromCharCode(...packet.subarray(0, 8));
  return magic === "OpusHead" || magic === "OpusTags";
}
