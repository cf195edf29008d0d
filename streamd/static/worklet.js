// AudioWorklet: microphone samples at the context's rate -> 16 kHz mono s16le chunks.
//
// Runs on the audio rendering thread. Each input sample goes through a windowed-sinc
// low-pass (so nothing above 8 kHz folds back into speech frequencies), then output
// samples are taken at the 16 kHz instants by linear interpolation between the two
// filtered input samples around them. Every `chunkMs` of output is posted to the page as
// an Int16Array buffer (transferred, not copied) with the level of that stretch.

function lowpass(step) {
  // Cut-off at 0.9 of the output Nyquist, in cycles per input sample.
  const fc = 0.45 / step;
  const half = Math.ceil(8 * step);
  const taps = new Float32Array(2 * half + 1);
  let sum = 0;
  for (let i = 0; i < taps.length; i++) {
    const n = i - half;
    const sinc = n === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * n) / (Math.PI * n);
    const hann = 0.5 + 0.5 * Math.cos((Math.PI * n) / (half + 1));
    taps[i] = sinc * hann;
    sum += taps[i];
  }
  for (let i = 0; i < taps.length; i++) taps[i] /= sum; // unity gain at 0 Hz
  return taps;
}

class Pcm16kProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    const target = opts.targetRate || 16000;
    this.step = sampleRate / target; // input samples per output sample
    this.taps = this.step > 1 ? lowpass(this.step) : Float32Array.of(1);
    this.hist = new Float32Array(this.taps.length); // ring buffer of recent inputs
    this.head = 0;
    this.prev = 0; // previous filtered sample
    this.t = 1; // next output instant, in input samples after `prev`
    this.chunk = Math.round((target * (opts.chunkMs || 100)) / 1000);
    this.out = new Int16Array(this.chunk);
    this.fill = 0;
    this.sumSq = 0;
    this.peak = 0;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "flush") this.post(true);
    };
  }

  post(last) {
    const n = this.fill;
    const pcm = this.out.slice(0, n).buffer;
    const rms = n ? Math.sqrt(this.sumSq / n) : 0;
    this.port.postMessage({ pcm, rms, peak: this.peak, last }, [pcm]);
    this.fill = 0;
    this.sumSq = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true; // no source connected yet
    const frames = input[0].length;
    const taps = this.taps;
    const hist = this.hist;
    const size = hist.length;
    for (let i = 0; i < frames; i++) {
      let x = 0;
      for (let c = 0; c < input.length; c++) x += input[c][i];
      x /= input.length; // mix down
      hist[this.head] = x;
      let y = 0;
      let j = this.head;
      for (let k = 0; k < taps.length; k++) {
        y += taps[k] * hist[j];
        j = j === 0 ? size - 1 : j - 1;
      }
      this.head = this.head + 1 === size ? 0 : this.head + 1;
      while (this.t <= 1) {
        const v = this.prev + (y - this.prev) * this.t;
        const s = Math.max(-32768, Math.min(32767, Math.round(v * 32768)));
        this.out[this.fill++] = s;
        this.sumSq += v * v;
        this.peak = Math.max(this.peak, Math.abs(v));
        if (this.fill === this.chunk) this.post(false);
        this.t += this.step;
      }
      this.t -= 1;
      this.prev = y;
    }
    return true;
  }
}

registerProcessor("pcm16k", Pcm16kProcessor);
