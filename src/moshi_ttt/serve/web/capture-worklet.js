// The microphone, at the AudioContext's rate (24 kHz), posted in blocks of `block` samples.
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.block = (options.processorOptions && options.processorOptions.block) || 1920;
    this.buffer = new Float32Array(this.block);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    let i = 0;
    while (i < input.length) {
      const n = Math.min(input.length - i, this.block - this.filled);
      this.buffer.set(input.subarray(i, i + n), this.filled);
      this.filled += n;
      i += n;
      if (this.filled === this.block) {
        let sum = 0;
        for (let k = 0; k < this.block; k++) sum += this.buffer[k] * this.buffer[k];
        this.port.postMessage({ pcm: this.buffer, rms: Math.sqrt(sum / this.block) }, [
          this.buffer.buffer,
        ]);
        this.buffer = new Float32Array(this.block);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("moshi-ttt-capture", Capture);
