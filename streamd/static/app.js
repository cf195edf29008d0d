// streamd browser client: microphone -> AudioWorklet (16 kHz s16le) -> WebSocket
// /v1/stream; partials and finals from the daemon -> the page. Speaks only the public
// protocol (version 1). No build step, no external files: everything is served by the
// daemon next to this file.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BUFFERED_BYTES = 1 << 20; // socket backlog beyond this: drop audio, say so
const RATE = 16000; // what the worklet sends: stream time = samples / RATE
// Resume (docs/protocol.md, "Resuming a session"): the audio since the end of the last
// final is kept; when the connection breaks, the page reconnects to the same URL with
// back-off for up to RESUME_S and continues the session, re-sending that audio.
const RESUME_S = 60;
const RESUMABLE_CLOSE = new Set([1001, 1006, 1012, 1013, 1014]); // daemon gone / restarting
const MAX_KEPT_S = 600; // longest stretch without a final that can be re-sent

// Read-only view of the session for people and tests (Runtime.evaluate).
const state = {
  status: "idle", // idle | starting | running | reconnecting | stopping | done | error
  session: null,
  finals: [],
  partial: "",
  errors: [],
  droppedChunks: 0,
  sentBytes: 0,
  resumes: 0, // connections that continued the session (start.resume)
};
window.streamd = state;

let ws = null;
let audio = null; // {ctx, stream, node}
let opened = false;
let ready = false;
let finished = false;
let stopSent = false;
let stopWanted = false; // Stop pressed: send `stop` once the audio is out
// The session's audio: chunks {start (sample), pcm} not yet covered by a final, in order.
let kept = [];
let streamSamples = 0; // samples in the session's stream so far (sent or to be re-sent)
let nextSegment = 0; // the segment number after the last final received
let resuming = null; // {deadline, delay, timer} while reconnecting

function token() {
  return new URLSearchParams(location.search).get("token");
}

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const t = token();
  return `${scheme}//${location.host}/v1/stream` + (t ? `?token=${encodeURIComponent(t)}` : "");
}

function formatTime(seconds) {
  const centis = Math.round(Math.max(0, seconds) * 100);
  const minutes = Math.floor(centis / 6000);
  const rest = ((centis % 6000) / 100).toFixed(2).padStart(5, "0");
  return `${minutes}:${rest}`;
}

function setStatus(status, text) {
  state.status = status;
  $("status").textContent = text;
  const button = $("toggle");
  const live = status === "running" || status === "reconnecting";
  button.dataset.state = live ? "running" : "idle";
  button.textContent = live || status === "stopping" ? "Stop" : "Start";
  button.disabled = status === "starting" || status === "stopping";
}

function showError(text) {
  state.errors.push(text);
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setLevel(rms) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -60;
  const clamped = Math.max(-60, Math.min(0, db));
  $("level-bar").style.width = `${((clamped + 60) / 60) * 100}%`;
  $("level").setAttribute("aria-valuenow", clamped.toFixed(0));
}

function addFinal(event) {
  state.finals.push(event);
  const item = document.createElement("li");
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = `${formatTime(event.start)} – ${formatTime(event.end)}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = (event.text || "").trim();
  item.append(time, text);
  $("transcript").append(item);
  setPartial("");
  item.scrollIntoView({ block: "nearest" });
}

function setPartial(text, stable = "") {
  state.partial = text;
  const box = $("partial");
  box.textContent = "";
  // The daemon may mark a prefix that will not change any more: show it firmer.
  if (stable && text.startsWith(stable)) {
    const firm = document.createElement("span");
    firm.className = "stable";
    firm.textContent = stable;
    box.append(firm, text.slice(stable.length));
  } else {
    box.textContent = text;
  }
}

const ERROR_TEXT = {
  unauthorized: "Refused: the daemon needs a valid token (open this page as /?token=YOUR_TOKEN).",
  overloaded: "The daemon is busy (too many streams). Try again later.",
  bad_request: "The daemon rejected the stream",
  unsupported: "The daemon does not support this stream",
  internal: "The daemon failed",
};

function onEvent(event) {
  switch (event.type) {
    case "ready":
      ready = true;
      state.session = event.session;
      if (event.resume) {
        state.resumes += 1;
        clearError();
      }
      resuming = null;
      if (stopWanted) setStatus("stopping", "Finishing the last words…");
      else setStatus("running", `Listening — session ${event.session}, ${event.pipeline}`);
      // Everything not covered by a final yet: on a resumed connection, the audio the
      // daemon may have lost with the old one.
      for (const chunk of kept) sendChunk(chunk.pcm);
      if (stopWanted) sendStop();
      break;
    case "partial":
      setPartial(event.text || "", event.stable || "");
      break;
    case "final":
      addFinal(event);
      nextSegment = Math.max(nextSegment, event.segment + 1);
      forget(Math.round(event.end * RATE));
      break;
    case "error":
      if (!ready && state.session && resuming) return; // resume refused: try again
      showError(`${ERROR_TEXT[event.code] || "Error"}: ${event.message || event.code}`);
      break;
    case "done":
      nextSegment = Math.max(nextSegment, event.segments);
      if (!stopSent) {
        // The daemon ended the session before our stop (it is shutting down): go on
        // with the session elsewhere when the connection closes.
        ws.endedEarly = true;
        break;
      }
      finished = true;
      setStatus("done", `Stopped — ${event.segments} segment(s).`);
      break;
    default:
      break; // newer event types: ignore, as the protocol allows
  }
}

function sendChunk(buffer) {
  ws.send(buffer);
  state.sentBytes += buffer.byteLength;
}

// Drop kept audio before stream sample `sample` (a final covers it).
function forget(sample) {
  while (kept.length && kept[0].start < sample) {
    const chunk = kept[0];
    const samples = chunk.pcm.byteLength / 2;
    if (chunk.start + samples <= sample) {
      kept.shift();
    } else {
      chunk.pcm = chunk.pcm.slice(2 * (sample - chunk.start));
      chunk.start = sample;
    }
  }
}

function keptStart() {
  return kept.length ? kept[0].start : streamSamples;
}

function sendStop() {
  stopWanted = true;
  if (ws && ready && ws.readyState === WebSocket.OPEN && !stopSent && !finished) {
    stopSent = true;
    ws.send(JSON.stringify({ type: "stop" }));
  }
}

function onAudio(msg) {
  setLevel(msg.rms);
  if (finished || stopWanted) return;
  if (msg.pcm.byteLength) {
    const live = ws && ready && ws.readyState === WebSocket.OPEN;
    if (live && ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      // Network slower than real time: keep the page live. The chunk is not part of the
      // session's stream (stream times count only what the daemon gets).
      state.droppedChunks += 1;
      if (state.droppedChunks === 1) showError("The connection is too slow: some audio was dropped.");
    } else {
      // Until `ready` (or while reconnecting) audio waits in `kept`, bounded.
      kept.push({ start: streamSamples, pcm: msg.pcm });
      streamSamples += msg.pcm.byteLength / 2;
      if (streamSamples - keptStart() > MAX_KEPT_S * RATE) forget(streamSamples - MAX_KEPT_S * RATE);
      if (live) sendChunk(msg.pcm);
    }
  }
  if (msg.last) sendStop();
}

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("This browser blocks the microphone here: open the page over https or on localhost.");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    const why = {
      NotAllowedError: "Microphone permission was denied. Allow the microphone for this page and press Start again.",
      SecurityError: "Microphone permission was denied. Allow the microphone for this page and press Start again.",
      NotFoundError: "No microphone was found.",
      OverconstrainedError: "No microphone was found.",
      NotReadableError: "The microphone could not be opened (is another program using it?).",
    }[err.name];
    throw new Error(why || `Could not open the microphone: ${err.name}: ${err.message}`);
  }
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm16k", {
    numberOfInputs: 1,
    numberOfOutputs: 1, // connected to the (silent) output so the graph pulls it
    processorOptions: { targetRate: 16000, chunkMs: 100 },
  });
  node.port.onmessage = (e) => onAudio(e.data);
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(ctx.destination); // the node writes no output: silence
  await ctx.resume();
  return { ctx, stream, node };
}

function closeMicrophone() {
  if (!audio) return;
  const { ctx, stream, node } = audio;
  audio = null;
  node.port.onmessage = null;
  for (const track of stream.getTracks()) track.stop();
  ctx.close();
  setLevel(0);
}

// The browser hides the HTTP status of a refused WebSocket handshake; ask the same URL
// over plain HTTP to tell a refusal (401/503) from a daemon that is not there.
async function explainRefusal() {
  try {
    const r = await fetch(streamUrl().replace(/^ws/, "http"), { cache: "no-store" });
    if (r.status === 401) return ERROR_TEXT.unauthorized;
    if (r.status === 503) return "The daemon refused the stream: it is busy or shutting down. Try again later.";
    return `Could not open the stream (HTTP ${r.status} from the daemon).`;
  } catch {
    return "The daemon is not reachable (is streamd running?).";
  }
}

function connect() {
  opened = ready = stopSent = false;
  const start = { type: "start", sample_rate: RATE, encoding: "pcm_s16le", channels: 1 };
  if (state.session) {
    start.session = state.session;
    start.resume = { session: state.session, offset: keptStart() / RATE, segment: nextSegment };
  }
  ws = new WebSocket(streamUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    opened = true;
    ws.send(JSON.stringify(start));
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return;
    try {
      onEvent(JSON.parse(e.data));
    } catch (err) {
      console.warn("bad message from the daemon", err);
    }
  };
  ws.onclose = async (e) => {
    const wasOpened = opened;
    const endedEarly = ws.endedEarly;
    ws = null;
    if (finished) {
      closeMicrophone();
      return;
    }
    const broken = resuming || (wasOpened && (endedEarly || RESUMABLE_CLOSE.has(e.code)));
    if (broken && reconnect(e)) return;
    closeMicrophone();
    if (resuming) {
      resuming = null;
      showError(`Disconnected from the daemon; could not resume the session within ${RESUME_S} s.`);
    } else if (!wasOpened) {
      showError(await explainRefusal());
    } else if (state.errors.length === 0 || e.code !== 1000) {
      const why = e.reason ? `: ${e.reason}` : "";
      showError(`Disconnected from the daemon (code ${e.code}${why}).`);
    }
    setStatus("error", "Not connected.");
  };
}

// After a broken connection: try again with back-off (100 ms doubling to 2 s, jittered)
// until RESUME_S; false when that time is up.
function reconnect(e) {
  const now = performance.now();
  if (!resuming) {
    resuming = { deadline: now + RESUME_S * 1000, delay: 100 };
    const why = e.reason ? `: ${e.reason}` : "";
    showError(`Disconnected from the daemon (code ${e.code}${why}); reconnecting…`);
    setStatus("reconnecting", "Connection lost — reconnecting…");
  }
  if (now + resuming.delay > resuming.deadline) return false;
  resuming.timer = setTimeout(connect, resuming.delay * (0.5 + Math.random() / 2));
  resuming.delay = Math.min(2000, resuming.delay * 2);
  return true;
}

async function start() {
  clearError();
  setPartial("");
  state.errors = [];
  state.session = null;
  kept = [];
  streamSamples = nextSegment = 0;
  finished = stopWanted = false;
  resuming = null;
  setStatus("starting", "Opening the microphone…");
  try {
    audio = await openMicrophone();
  } catch (err) {
    closeMicrophone();
    showError(err.message);
    setStatus("error", "Microphone unavailable.");
    return;
  }
  setStatus("starting", "Connecting…");
  connect();
}

function stop() {
  setStatus("stopping", "Finishing the last words…");
  if (audio) {
    // The worklet posts what it still holds with last=true; onAudio then sends stop.
    audio.node.port.postMessage({ type: "flush" });
    setTimeout(() => {
      closeMicrophone();
      sendStop(); // in case the flush never came back
    }, 500);
  } else {
    sendStop();
  }
}

$("toggle").addEventListener("click", () => {
  if (state.status === "running" || state.status === "reconnecting") stop();
  else if (state.status !== "starting" && state.status !== "stopping") start();
});
