// The page for people at /ui/: browse keys by prefix, upload files (tus, resumable), play media
// (MP4/WebM natively, HLS through the bundled hls.js), show an object's manifest and the locks.
//
// Rules this file keeps (the page runs under a strict Content-Security-Policy, on the same origin
// as every object anyone uploads):
// - the bearer token lives in this closure only: never localStorage, sessionStorage or a cookie,
//   where a page uploaded to this origin could read it;
// - object names, types and manifests are data: they reach the DOM through textContent only,
//   never innerHTML;
// - no inline script, style or event handler attributes: listeners are added here.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const HLS_TYPES = new Set(["application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "audio/x-mpegurl"]);
  const SEGMENT_TYPES = new Set(["video/mp2t", "video/iso.segment", "audio/iso.segment"]);
  const PAGE_SIZE = 100;

  const state = {
    token: null,          // memory only
    config: { tokens: false, signed_reads: false },
    prefix: "",
    after: null,
    listing: 0,           // the latest listing asked for: answers to older ones are dropped
    hls: null,
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function setStatus(text, kind) {
    const s = $("status");
    s.textContent = text;
    s.className = kind || "";
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n / 1024, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(v < 10 ? 1 : 0) + " " + units[i];
  }

  function formatDate(http) {
    const d = new Date(http);
    return isNaN(d) ? String(http) : d.toISOString().slice(0, 16).replace("T", " ");
  }

  function essence(type) { return String(type || "").split(";")[0].trim().toLowerCase(); }

  function objectPath(key) { return "/objects/" + key.split("/").map(encodeURIComponent).join("/"); }

  function authHeaders() { return state.token ? { Authorization: "Bearer " + state.token } : {}; }

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, options = {}) {
    const res = await fetch(path, {
      ...options,
      headers: { ...authHeaders(), ...(options.headers || {}) },
      credentials: "omit",
      cache: "no-store",
    });
    const text = await res.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
    if (!res.ok) {
      const err = new ApiError(res.status, body && body.error, (body && body.message) || ("HTTP " + res.status));
      if (res.status === 401) askForToken("This needs a bearer token.");
      else if (res.status === 403 && err.code === "forbidden" && state.token) {
        state.token = null;
        askForToken("That token is not accepted.");
      }
      throw err;
    }
    return body;
  }

  function fail(what, err) {
    setStatus(what + ": " + (err && err.message ? err.message : String(err)), "bad");
  }

  // ------------------------------------------------------------------ token
  function askForToken(message) {
    $("token-message").textContent = message || "";
    $("token-box").hidden = false;
    $("token").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token");
    state.token = input.value.trim() || null;
    input.value = "";
    $("token-box").hidden = true;
    setStatus(state.token ? "Token set (in memory only)." : "", "good");
    listObjects($("prefix").value, false);
    refreshLocks();
  });

  // ------------------------------------------------------------------ browse
  function playKind(obj) {
    const type = essence(obj.content_type);
    if (HLS_TYPES.has(type) || obj.key.toLowerCase().endsWith(".m3u8")) return "hls";
    if (SEGMENT_TYPES.has(type)) return null;  // a segment alone is not playable
    if (type.startsWith("video/") || type.startsWith("audio/")) return "native";
    return null;
  }

  function objectRow(obj) {
    const tr = document.createElement("tr");
    tr.dataset.key = obj.key;
    tr.append(el("td", obj.key, "key"), el("td", formatBytes(obj.size), "num"), el("td", obj.content_type, "type"),
              el("td", formatDate(obj.last_modified), "when"));
    const actions = el("td", null, "actions");
    if (playKind(obj)) {
      const play = el("button", "play", "link");
      play.type = "button";
      play.addEventListener("click", () => playObject(obj, tr));
      actions.append(play);
    }
    const manifest = el("button", "manifest", "link");
    manifest.type = "button";
    manifest.addEventListener("click", () => showManifest(obj.key, tr));
    actions.append(manifest);
    tr.append(actions);
    return tr;
  }

  function select(tr) {
    for (const row of document.querySelectorAll("#objects tr.selected")) row.classList.remove("selected");
    if (tr) tr.classList.add("selected");
  }

  async function listObjects(prefix, append) {
    if (state.config.signed_reads && !state.config.tokens) {
      setStatus("Reads need signed URLs here and the gateway has no tokens to ask for one: listing and playing are off; uploads work.", "bad");
      return;
    }
    if (state.config.signed_reads && !state.token) {
      askForToken("Listing needs a bearer token on this gateway (reads need signed URLs).");
      return;
    }
    const params = new URLSearchParams({ prefix, limit: String(PAGE_SIZE) });
    if (append && state.after) params.set("after", state.after);
    const ticket = ++state.listing;
    let doc;
    try {
      doc = await api("/objects?" + params.toString());
    } catch (err) {
      if (ticket === state.listing) fail("Listing failed", err);
      return;
    }
    if (ticket !== state.listing) return;
    state.prefix = prefix;
    state.after = doc.next_after;
    const body = $("objects").tBodies[0];
    if (!append) body.replaceChildren();
    for (const obj of doc.objects) body.append(objectRow(obj));
    $("list-empty").hidden = body.rows.length > 0;
    $("more").hidden = !doc.next_after;
    setStatus(body.rows.length + (doc.next_after ? "+" : "") + " objects under " + JSON.stringify(prefix));
  }

  $("list-form").addEventListener("submit", (event) => {
    event.preventDefault();
    listObjects($("prefix").value, false);
  });
  $("more").addEventListener("click", () => listObjects(state.prefix, true));

  // ------------------------------------------------------------------ manifest
  async function showManifest(key, tr) {
    select(tr);
    $("manifest-key").textContent = key;
    const pre = $("manifest-json");
    try {
      const doc = await api(objectPath(key) + "?manifest");
      pre.textContent = JSON.stringify(doc, null, 2);
      pre.className = "";
    } catch (err) {
      pre.textContent = err.message;
      pre.className = "bad";
    }
  }

  // ------------------------------------------------------------------ player
  async function playableUrl(key) {
    if (!state.config.signed_reads) return objectPath(key);
    if (!state.token) {
      askForToken("Reads need signed URLs here: a token lets this page ask the gateway for one.");
      throw new Error("a token is needed to play");
    }
    // A prefix-signed URL for the key's folder, so an HLS playlist's relative URLs carry it too.
    const doc = await api("/admin/sign", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key }),
    });
    return doc.path;
  }

  async function playObject(obj, tr) {
    select(tr);
    const video = $("video");
    const kind = playKind(obj);
    if (state.hls) { state.hls.destroy(); state.hls = null; }
    video.removeAttribute("src");
    video.load();
    let url;
    try {
      url = await playableUrl(obj.key);
    } catch (err) {
      fail("Cannot play " + obj.key, err);
      return;
    }
    video.dataset.key = obj.key;
    if (kind === "hls" && window.Hls && window.Hls.isSupported()) {
      const hls = new window.Hls();
      state.hls = hls;
      hls.on(window.Hls.Events.ERROR, (_event, data) => {
        if (data.fatal) fail("Playback failed", new Error(data.details + (data.response ? " (HTTP " + data.response.code + ")" : "")));
      });
      hls.loadSource(url);
      hls.attachMedia(video);
      video.dataset.engine = "hls.js";
    } else {
      video.src = url;  // MP4/WebM, or HLS where the browser plays it itself (Safari)
      video.dataset.engine = "native";
    }
    $("now-playing").textContent = obj.key + " (" + (video.dataset.engine === "hls.js" ? "hls.js" : obj.content_type) + ")";
    try {
      await video.play();
    } catch (err) {
      if (err && err.name !== "AbortError") fail("Playback did not start", err);
    }
  }

  $("video").addEventListener("error", () => {
    const e = $("video").error;
    if (e && !state.hls) fail("Playback failed", new Error("media error " + e.code + (e.message ? ": " + e.message : "")));
  });

  // ------------------------------------------------------------------ upload (tus)
  // Upload URLs remembered in memory for this page's life (not localStorage: nothing this page
  // knows is left behind for other pages of this origin), so picking the same file again after a
  // failure resumes it from the gateway's stored offset.
  const memoryUrlStorage = (() => {
    const items = new Map();
    let n = 0;
    return {
      findAllUploads: async () => [...items.values()],
      findUploadsByFingerprint: async (fp) => [...items.values()].filter((u) => u.fingerprint === fp),
      removeUpload: async (k) => { items.delete(k); },
      addUpload: async (fp, upload) => {
        const k = "upload-" + (++n);
        items.set(k, { ...upload, fingerprint: fp, urlStorageKey: k });
        return k;
      },
    };
  })();

  function uploadOne(file, key, onBytes) {
    return new Promise((resolve, reject) => {
      const upload = new window.tus.Upload(file, {
        endpoint: new URL("/uploads/", window.location.href).href,
        chunkSize: 8 * 1024 * 1024,
        retryDelays: [0, 1000, 3000, 5000, 10000],
        // No filetype: the gateway types the object from its key's extension, with the table
        // players need (browsers disagree about .ts and .m4s).
        metadata: { key, filename: file.name },
        headers: authHeaders(),
        urlStorage: memoryUrlStorage,
        fingerprint: async () => ["chunkgate", key, file.name, file.size, file.lastModified].join("\n"),
        storeFingerprintForResuming: true,
        removeFingerprintOnSuccess: true,
        onProgress: (sent) => onBytes(sent),
        onSuccess: () => resolve(),
        onError: (err) => {
          const res = err && err.originalResponse;
          let message = String(err && err.message ? err.message : err);
          if (res) {
            try { message = JSON.parse(res.getBody()).message || message; } catch (e) { /* not JSON */ }
            if (res.getStatus() === 401) askForToken("Uploading needs a bearer token.");
          }
          reject(new Error(message));
        },
      });
      upload.findPreviousUploads().then((previous) => {
        if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
        upload.start();
      }, reject);
    });
  }

  $("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = [...$("file").files];
    if (!files.length) { setStatus("Pick one or more files to upload.", "bad"); return; }
    if (state.config.tokens && !state.token) { askForToken("Uploading needs a bearer token."); return; }
    const prefix = $("upload-prefix").value;
    const total = files.reduce((sum, f) => sum + f.size, 0) || 1;
    const progress = $("upload-progress");
    const status = $("upload-status");
    const button = $("upload-button");
    button.disabled = true;
    let done = 0;
    const failed = [];
    for (const file of files) {
      const key = prefix + file.name;
      status.textContent = "Uploading " + key + "…";
      status.className = "hint";
      try {
        await uploadOne(file, key, (sent) => {
          progress.value = (done + sent) / total;
          status.textContent = "Uploading " + key + ": " + Math.floor(100 * progress.value) + "% of " + formatBytes(total);
        });
      } catch (err) {
        failed.push(key + ": " + err.message);
      }
      done += file.size;
      progress.value = done / total;
    }
    button.disabled = false;
    if (failed.length) {
      status.textContent = "Failed: " + failed.join("; ");
      status.className = "bad";
    } else {
      status.textContent = "Uploaded " + files.length + " file" + (files.length > 1 ? "s" : "") + " (" + formatBytes(total) + ").";
      status.className = "good";
    }
    $("prefix").value = prefix;
    listObjects(prefix, false);
  });

  // ------------------------------------------------------------------ locks
  async function refreshLocks() {
    if (state.config.tokens && !state.token) {
      $("locks-totals").textContent = "A token is needed to see the locks.";
      return;
    }
    let doc;
    try {
      doc = await api("/admin/locks");
    } catch (err) {
      $("locks-totals").textContent = err.message;
      return;
    }
    const t = doc.totals || {};
    $("locks-totals").textContent = (t.active || 0) + " held, " + (t.waiting || 0) + " waiting, " +
      (t.acquisitions || 0) + " acquisitions, " + (t.timeouts || 0) + " timeouts, " + (t.stale_cleared || 0) + " stale cleared";
    const body = $("locks-table").tBodies[0];
    body.replaceChildren();
    $("locks-empty").hidden = (doc.locks || []).length > 0;
    for (const lock of doc.locks || []) {
      const tr = document.createElement("tr");
      tr.append(el("td", lock.key, "key"), el("td", lock.owner), el("td", Number(lock.age_seconds).toFixed(1) + " s", "num"),
                el("td", lock.waiters, "num"));
      body.append(tr);
    }
  }

  $("locks-refresh").addEventListener("click", refreshLocks);

  // ------------------------------------------------------------------ start
  async function start() {
    try {
      state.config = await api("/ui/config.json");
    } catch (err) {
      fail("This gateway did not answer", err);
      return;
    }
    if (state.config.tokens) {
      askForToken(state.config.signed_reads
        ? "This gateway has tokens and signed reads: a token is needed to list, upload and play."
        : "This gateway has tokens: enter one to upload and to see the locks.");
    }
    document.body.dataset.ready = "true";
    if (!state.config.signed_reads || !state.config.tokens) listObjects("", false);
    refreshLocks();
  }

  start();
})();
