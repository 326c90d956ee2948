// Drives the real hls.js and dash.js (npm) against a ladder on the gateway, for
// tests/test_streaming_players.py. The test calls window.runHls / window.runDash over DevTools
// and polls window.__result. Every step reports what the player itself saw: positions after
// seeks, the rendition (level, picture width) playing after a switch, the fragments it loaded.
"use strict";

window.__result = null;

function makeVideo() {
  const v = document.createElement("video");
  v.muted = true;
  v.preload = "auto";
  v.crossOrigin = "anonymous";
  document.body.appendChild(v);
  return v;
}

function mediaEvent(v, name) {
  return new Promise((resolve, reject) => {
    const ok = () => { done(); resolve(); };
    const bad = () => { done(); reject(new Error("media error " + (v.error ? v.error.code + " " + v.error.message : "?"))); };
    const done = () => { v.removeEventListener(name, ok); v.removeEventListener("error", bad); };
    v.addEventListener(name, ok);
    v.addEventListener("error", bad);
  });
}

async function until(check, what, failed) {
  while (!check()) {
    if (failed.error) throw failed.error;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (failed.error) throw failed.error;
}

async function playFor(v, seconds, failed) {
  const from = v.currentTime;
  await v.play();
  await until(() => v.currentTime >= from + seconds, "playing", failed);
}

async function seekAll(v, seeks, seek, failed) {
  const out = [];
  for (const t of seeks) {
    const seeked = mediaEvent(v, "seeked");
    seek(t);
    await seeked;
    await until(() => v.readyState >= 2, "a frame at the new position", failed);
    out.push({ target: t, currentTime: v.currentTime, readyState: v.readyState });
  }
  return out;
}

async function hlsSession(src, seeks) {
  const v = makeVideo();
  const failed = {};
  const hls = new Hls({ capLevelToPlayerSize: false, startLevel: 0 });
  const frags = [];
  hls.on(Hls.Events.FRAG_LOADED, (_e, d) => frags.push({ level: d.frag.level, sn: d.frag.sn, url: d.frag.url }));
  hls.on(Hls.Events.ERROR, (_e, d) => {
    if (d.fatal) failed.error = new Error("hls.js fatal " + d.type + " " + d.details + (d.response ? " HTTP " + d.response.code : ""));
  });
  hls.loadSource(src);
  hls.attachMedia(v);
  await until(() => hls.levels && hls.levels.length > 0 && v.readyState >= 1, "manifest and metadata", failed);
  const result = { levels: hls.levels.map((l) => ({ width: l.width, height: l.height, bitrate: l.bitrate })) };
  result.duration = v.duration;
  await playFor(v, 1.0, failed);
  v.pause();
  result.played = v.currentTime;
  result.startLevel = hls.currentLevel;
  result.seeks = await seekAll(v, seeks, (t) => { v.currentTime = t; }, failed);
  // Switch rendition: to the other one than is playing, immediately (hls.js flushes the buffer).
  const from = hls.currentLevel;
  const target = from === 0 ? 1 : 0;
  const fragsBefore = frags.length;
  const switchedAt = v.currentTime;
  hls.currentLevel = target;
  await until(() => hls.currentLevel === target, "the switch", failed);
  await playFor(v, 2.5, failed);
  await until(() => v.videoWidth === result.levels[target].width, "the new rendition's pictures", failed);
  result.switch = {
    from, target, level: hls.currentLevel, switchedAt, playedTo: v.currentTime,
    videoWidth: v.videoWidth, paused: v.paused,
    fragsAfter: frags.slice(fragsBefore).map((f) => f.level),
  };
  result.frags = frags;
  hls.destroy();
  return result;
}

async function dashSession(src, seeks) {
  const v = makeVideo();
  const failed = {};
  const player = dashjs.MediaPlayer().create();
  const segments = [];
  player.on(dashjs.MediaPlayer.events.ERROR, (e) => {
    failed.error = new Error("dash.js error " + JSON.stringify(e.error && (e.error.message || e.error.code) || e.error));
  });
  player.on(dashjs.MediaPlayer.events.FRAGMENT_LOADING_COMPLETED, (e) => {
    if (e.request && e.request.type === "MediaSegment") segments.push({ media: e.request.mediaType, url: e.request.url });
  });
  player.initialize(v, src, false);
  await until(() => v.readyState >= 1, "metadata", failed);
  const result = { duration: v.duration };
  await playFor(v, 1.0, failed);
  v.pause();
  result.played = v.currentTime;
  result.seeks = await seekAll(v, seeks, (t) => player.seek(t), failed);
  await playFor(v, 1.0, failed);
  result.playedAfterSeeks = v.currentTime;
  result.videoWidth = v.videoWidth;
  result.segments = segments;
  player.reset();
  return result;
}

function report(promise) {
  window.__result = null;
  promise.then(
    (r) => { window.__result = { ok: true, ...r }; },
    (e) => { window.__result = { ok: false, error: String(e && e.message || e) }; },
  );
}

window.runHls = (src, seeks) => report(hlsSession(src, seeks));
window.runDash = (src, seeks) => report(dashSession(src, seeks));
