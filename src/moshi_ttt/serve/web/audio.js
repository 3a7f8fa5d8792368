// The microphone to Ogg/Opus pages (WebCodecs AudioEncoder + ogg.js), and Moshi's Ogg/Opus
// pages to the speakers (ogg.js + WebCodecs AudioDecoder + Web Audio).
import { isOpusHeader, OggOpusWriter, OggReader } from "./ogg.js";

export const SAMPLE_RATE = 24000; // moshi's
const FRAME = 1920; // 80 ms

export function hasWebCodecsOpus() {
  return typeof AudioEncoder !== "undefined" && typeof AudioDecoder !== "undefined";
}

// The capture worklet's module, loaded once per AudioContext (before the conversation opens).
export function loadCapture(ctx) {
  if (!ctx.moshiCapture) {
    ctx.moshiCapture = ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
  }
  return ctx.moshiCapture;
}

// Starts encoding the `stream` (a getUserMedia stream) in `ctx`; onPage(bytes) gets each Ogg
// page (headers first), onLevel(rms) the input level per 80 ms. Returns stop().
export async function startCapture(ctx, stream, onPage, onLevel, onError) {
  const config = { codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1, bitrate: 32000 };
  const support = await AudioEncoder.isConfigSupported(config);
  if (!support.supported) throw new Error("this browser cannot encode Opus (WebCodecs)");
  const writer = new OggOpusWriter(SAMPLE_RATE);
  let headersSent = false;
  const encoder = new AudioEncoder({
    output: (chunk) => {
      if (!headersSent) {
        for (const page of writer.headers()) onPage(page);
        headersSent = true;
      }
      const packet = new Uint8Array(chunk.byteLength);
      chunk.copyTo(packet);
      const samples48k = Math.round(((chunk.duration || 20000) * 48000) / 1e6);
      onPage(writer.packet(packet, samples48k));
    },
    error: (e) => onError(e),
  });
  encoder.configure(config);
  await loadCapture(ctx);
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "moshi-ttt-capture", {
    processorOptions: { block: FRAME },
  });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(node);
  node.connect(mute);
  mute.connect(ctx.destination); // keeps the worklet pulled, silently
  let timestamp = 0;
  node.port.onmessage = (event) => {
    if (encoder.state !== "configured") return;
    const pcm = event.data.pcm;
    encoder.encode(
      new AudioData({
        format: "f32",
        sampleRate: SAMPLE_RATE,
        numberOfFrames: pcm.length,
        numberOfChannels: 1,
        timestamp,
        data: pcm,
      }),
    );
    timestamp += (pcm.length * 1e6) / SAMPLE_RATE;
    onLevel(event.data.rms);
  };
  return () => {
    node.port.onmessage = null;
    source.disconnect();
    node.disconnect();
    mute.disconnect();
    if (encoder.state !== "closed") encoder.close();
    for (const track of stream.getTracks()) track.stop();
  };
}

// Plays Moshi's voice: push(oggBytes) as the pages arrive. `played` counts samples decoded.
export class Player {
  constructor(ctx, onError) {
    this.ctx = ctx;
    this.reader = new OggReader();
    this.played = 0;
    this.packets = 0;
    this.playhead = 0;
    this.timestamp = 0;
    this.decoder = new AudioDecoder({
      output: (data) => this._play(data),
      error: (e) => onError(e),
    });
    this.decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });
  }

  push(bytes) {
    for (const packet of this.reader.push(bytes)) {
      if (isOpusHeader(packet)) continue;
      if (this.decoder.state !== "configured") return;
      this.decoder.decode(
        new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: packet }),
      );
      this.timestamp += 20000;
      this.packets += 1;
    }
  }

  _play(data) {
    try {
      const n = data.numberOfFrames;
      const pcm = new Float32Array(n);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      const buffer = this.ctx.createBuffer(1, n, data.sampleRate);
      buffer.copyToChannel(pcm, 0);
      const node = this.ctx.createBufferSource();
      node.buffer = buffer;
      node.connect(this.ctx.destination);
      const now = this.ctx.currentTime;
      if (this.playhead < now + 0.05) this.playhead = now + 0.1; // a small jitter buffer
      node.start(this.playhead);
      this.playhead += n / data.sampleRate;
      this.played += n;
    } finally {
      data.close();
    }
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}
