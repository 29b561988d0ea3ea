// The web page of audio-analysis: submit recordings, follow their jobs, see who spoke when,
// whether two recordings are one voice and whose voice a recording is.
// Plain JavaScript against the public job API (the same routes any client uses); no framework,
// no build step and nothing loaded from outside this service. The audio is played from the
// file the user picked, in the browser: the service keeps no audio once a job ended.
"use strict";

const $ = (sel) => document.querySelector(sel);
const COLOURS = ["#2563eb", "#d97706", "#15803d", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777",
                 "#4b5563", "#65a30d"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LANE_LABEL_PX = 144; // .lane-label width (9rem)
// A running job's `step` as the page says it: the names are the pipeline's own
// ("discrete_diarization"), which told a user nothing. A step not listed is shown by its name.
const STEP_LABELS = {
  starting: "starting", downloading: "downloading the audio", segmentation: "finding speech",
  speaker_counting: "counting speakers", embeddings: "telling voices apart",
  discrete_diarization: "assigning turns", identification: "matching voiceprints",
};
function stepText(job) {
  if (job.status === "running") {
    const name = job.step ? (STEP_LABELS[job.step] || job.step.replaceAll("_", " ")) : "running";
    return `${name} ${Math.round(job.progress * 100)} %`;
  }
  return job.status === "failed" ? `failed: ${(job.error || {}).detail || ""}` : job.status;
}

const state = { picked: [], jobs: new Map(), shown: null, pxPerSecond: 1 };
// the panels that answer one question per job (compare, identify): the job each waits for (its
// latest submitted) and the one whose answer it shows
const PANELS = {
  compare: { awaiting: null, shown: null, status: $("#cmp-status"), error: $("#cmp-error"), answer: $("#cmp-answer") },
  identify: { awaiting: null, shown: null, status: $("#id-status"), error: $("#id-error"), answer: $("#id-answer") },
};
let submitting = false; // a submit is sending its files (see the Submit button's handler)

// --- the API ----------------------------------------------------------------------------------
// The key lives in this tab's sessionStorage: it survives a reload, not the tab. localStorage
// kept it on disk for good, for every later user of the browser profile and every page of this
// origin (the API docs run inline scripts); a key an older page stored there is removed.
const KEY_ITEM = "audio-analysis.api-key";
const keyInput = $("#api-key");
localStorage.removeItem(KEY_ITEM);
keyInput.value = sessionStorage.getItem(KEY_ITEM) || "";
// The key the lists were last read with. A "change" that leaves it as it was (the field losing
// focus after a paste the page had already taken, a key typed again) reads nothing again: the
// lists were rebuilt under the pointer, and the click that took the focus away (a "follow" right
// after typing the key) could land on a row that was no longer there and do nothing.
let appliedKey = keyInput.value.trim();
// Counts the key changes: an answer asked for under an earlier key (an upload, a job fetched to be
// shown or followed) that arrives after the change is dropped, not shown under the new key.
let keyEpoch = 0;
keyInput.addEventListener("change", () => {
  const key = keyInput.value.trim();
  if (key === appliedKey) return;
  appliedKey = key;
  keyEpoch += 1;
  if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM);
  forgetKeysJobs();
  refreshRecent();
  refreshVoiceprints();
  restoreFollowed();
});

// A key a header cannot carry (past ISO-8859-1: a dash or quote a word processor made of a
// pasted key's hyphen), said in words: the browser refused to send it with "Failed to execute
// 'fetch' on 'Window': ... String contains non ISO-8859-1 code point", which named neither the
// key nor the character. The key itself is not put on the screen.
function keyProblem(key) {
  const bad = /[^\u0000-\u00ff]/u.exec(key);
  if (!bad) return null;
  const code = bad[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  return `the API key holds a character no API key has ("${bad[0]}", U+${code}, at position ${bad.index + 1}): ` +
    "type it again, or paste it as plain text";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = keyInput.value.trim();
  const problem = keyProblem(key);
  if (problem) throw new Error(problem);
  if (key) headers["X-API-Key"] = key;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (_) {
    // the API stopped or restarting: as an upload says it (send), where the lists and a followed
    // job's row said the browser's "Failed to fetch"
    throw Object.assign(new Error("the service did not answer (network error)"), { network: true });
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw refusal(response.status, detail);
  }
  return response;
}

// an answer of the API's that is not a success, as api() and send() both report it
function refusal(status, detail) {
  return Object.assign(new Error(`${status}: ${detail}`), { status });
}

// --- choosing files ---------------------------------------------------------------------------
const drop = $("#drop");
function pick(files) {
  state.picked = Array.from(files);
  $("#picked").textContent = state.picked.map((f) => f.name).join(", ");
  $("#submit").disabled = submitting || (state.picked.length === 0 && !$("#audio-url").value.trim());
}
// how many times files were chosen: a submit clears the pick it sent, not one made while it sent
let picks = 0;
$("#files").addEventListener("change", (e) => { picks += 1; pick(e.target.files); });
$("#audio-url").addEventListener("input", () => pick(state.picked));
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { picks += 1; pick(e.dataTransfer.files); });
// A page come back to (back from the API docs, a tab restored) gets the files and the URL it had
// put back in its fields by the browser: the page took them for nothing picked, so the files were
// not listed and Submit stayed off with a URL in its field.
// (From the back-forward cache the page is as it was left: nothing to take.)
window.addEventListener("pageshow", (event) => { if (!event.persisted) pick($("#files").files); });

// --- submitting and following jobs -------------------------------------------------------------
// A form sent with XMLHttpRequest, whose upload reports progress (fetch's does not): a recording of
// hundreds of MB takes minutes to send, and the page said nothing meanwhile.
// key: the one the submit began under (a batch whose key is changed half-way still goes to the
// account it was started for, not part to one and part to another)
// started: given the request once it goes, for a cancel (xhr.abort(): rejected as `cancelled`)
function send(path, form, onProgress, key = keyInput.value.trim(), started = () => {}) {
  return new Promise((resolve, reject) => {
    const problem = keyProblem(key);
    if (problem) { reject(new Error(problem)); return; }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (key) xhr.setRequestHeader("X-API-Key", key);
    xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
    uploading += 1;
    xhr.addEventListener("loadend", () => { uploading -= 1; });
    xhr.addEventListener("abort", () => reject(Object.assign(new Error("upload cancelled"), { cancelled: true })));
    started(xhr);
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300 && body) resolve(body);
      else reject(refusal(xhr.status, (body && body.detail) || xhr.statusText || "no answer"));
    });
    xhr.addEventListener("error", () => reject(new Error("the service did not answer (network error)")));
    xhr.send(form);
  });
}

// Uploads under way: leaving the page (a reload, back, a link to the API docs) drops them, with
// nothing sent and no job made; the browser asks first. It left at once, and a recording of
// hundreds of MB, minutes into its upload, had to be sent again from the start.
let uploading = 0;
window.addEventListener("beforeunload", (event) => {
  if (uploading === 0) return;
  event.preventDefault();
  event.returnValue = ""; // what older browsers need to ask
});

// The Submit panel's upload, stopped by "cancel upload": the wrong file chosen, or one too large
// for the uplink, went on to its end (minutes for hundreds of MB), and the only way out was to
// close the page.
let submitXhr = null, submitCancelled = false;
$("#cancel-upload").addEventListener("click", () => {
  submitCancelled = true;
  if (submitXhr) submitXhr.abort();
});

function diarizeForm() {
  const form = new FormData();
  for (const name of ["num_speakers", "min_speakers", "max_speakers"]) {
    const value = $(`#${name.replace("_", "-")}`).value;
    if (value !== "") form.append(name, value);
  }
  if ($("#exclusive").checked) form.append("exclusive", "true");
  if ($("#use-voiceprints").checked) form.append("voiceprints", "all");
  return form;
}

// One submit at a time: the button stays disabled until every file has been sent. It stayed
// enabled while a recording uploaded, and a second click (nothing seemed to happen) sent the same
// files again, as a second job each.
// The number fields checked in the browser before anything is sent (their min, max and step, as
// the browser says it, at the field): the service checks them only once the whole upload is in,
// so "Speakers 0" sent all of a 500 MB recording to be refused 422. (The compare and identify
// panels' thresholds are left to the service, whose 422 says the range: two short recordings.)
function fieldsValid(...ids) {
  return ids.every((id) => $(id).reportValidity());
}

$("#submit").addEventListener("click", async () => {
  if (submitting) return;
  if (!fieldsValid("#num-speakers", "#min-speakers", "#max-speakers")) return;
  submitting = true;
  const button = $("#submit");
  button.disabled = true;
  const errors = [];
  $("#submit-error").textContent = "";
  const status = $("#submit-status");
  const files = state.picked, pickedAt = picks;
  const url = $("#audio-url").value.trim();
  const key = keyInput.value.trim(), epoch = keyEpoch;
  // a job sent under a key the field no longer holds is not followed here (the new key's page
  // would show the previous key's job); the user finds it again under that key
  const keep = (job, file) => { if (epoch === keyEpoch) track(job, file); };
  submitCancelled = false;
  let unsent = null; // the files a cancel left unsent, the one cut short first
  $("#cancel-upload").hidden = false;
  try {
    for (const [i, file] of files.entries()) {
      const form = diarizeForm();
      form.append("file", file, file.name);
      const which = files.length > 1 ? ` (${i + 1} of ${files.length})` : "";
      status.textContent = `uploading ${file.name}${which}…`;
      try {
        if (submitCancelled) throw Object.assign(new Error("upload cancelled"), { cancelled: true });
        const job = await send("/jobs/diarize", form, (done) => {
          status.textContent = `uploading ${file.name}${which}: ${Math.floor(done * 100)} %`;
        }, key, (xhr) => { submitXhr = xhr; });
        keep(job, file);
      } catch (err) {
        if (err.cancelled) {
          unsent = files.slice(i);
          break;
        }
        errors.push(`${file.name}: ${err.message}`);
      }
    }
    if (url && !submitCancelled) {
      // the worker fetches it (same limits and address policy as any job by URL); no audio to play
      const form = diarizeForm();
      form.append("file_url", url);
      status.textContent = "sending the URL…";
      try {
        keep(await send("/jobs/diarize", form, () => {}, key), null);
        $("#audio-url").value = "";
      } catch (err) {
        errors.push(`${url}: ${err.message}`);
      }
    }
  } finally {
    // every file's refusal, one a line (each replaced the one before: only the last was left)
    $("#submit-error").textContent = errors.join("\n");
    submitXhr = null;
    const onCancel = document.activeElement === $("#cancel-upload");
    $("#cancel-upload").hidden = true;
    // a cancel says what was not sent; those files stay picked (Submit sends them), the ones
    // sent before it are jobs as any
    status.textContent = unsent ? `upload cancelled: ${unsent.map((f) => f.name).join(", ")} not sent` +
      (url ? "; the URL not sent" : "") : "";
    submitting = false;
    // files chosen while these were sent are the next submit's: they were cleared with these,
    // without a word, and the user took them for sent
    if (picks !== pickedAt) {
      pick(state.picked);
    } else if (unsent) {
      pick(unsent);
      // from the keyboard, the focus was on "cancel upload", now hidden: it went to the page's
      // top, and the next Tab started from there; it goes on from Submit, which sends them again
      if (onCancel) $("#submit").focus();
    } else {
      pick([]);
      $("#files").value = "";
    }
  }
  refreshRecent();
});

// The jobs this tab follows, by id, in its sessionStorage: a reload (or a browser that restored
// the tab) follows them again, where the page forgot them and a running job was left as a
// static line in Recent jobs, with no progress and no way to cancel it.
const FOLLOWED_ITEM = "audio-analysis.followed-jobs";
const FOLLOWED_MAX = 50;
function followed() {
  try { return JSON.parse(sessionStorage.getItem(FOLLOWED_ITEM) || "[]").filter((id) => typeof id === "string"); }
  catch (_) { return []; }
}
function setFollowed(ids) {
  const kept = ids.slice(-FOLLOWED_MAX);
  sessionStorage.setItem(FOLLOWED_ITEM, JSON.stringify(kept));
  // the names the page gave its jobs ("a.wav and b.wav": a record names only the first file),
  // for as long as they are followed
  const names = jobNames();
  setJobNames(Object.fromEntries(kept.filter((id) => id in names).map((id) => [id, names[id]])));
}
const NAMES_ITEM = "audio-analysis.job-names";
function jobNames() {
  try {
    const names = JSON.parse(sessionStorage.getItem(NAMES_ITEM) || "{}");
    return names && typeof names === "object" && !Array.isArray(names) ? names : {};
  } catch (_) { return {}; }
}
function setJobNames(names) { sessionStorage.setItem(NAMES_ITEM, JSON.stringify(names)); }

// name: what the job's row (and its answer) calls it, where the record's filename (the first
// file's) does not say it all: a comparison is of two files
function track(job, file, restored = false, name = null) {
  if (state.jobs.has(job.job_id)) return;
  if (name) setJobNames(Object.assign(jobNames(), { [job.job_id]: name }));
  else name = typeof jobNames()[job.job_id] === "string" ? jobNames()[job.job_id] : null;
  const row = document.createElement("div");
  row.className = "job";
  row.dataset.jobId = job.job_id;
  row.innerHTML = `<span class="name"></span><span class="step"></span><div class="bar" role="progressbar"><div></div></div>
    <span><button type="button" class="cancel">cancel</button> <button type="button" class="show" hidden>show</button></span>`;
  const called = name || job.filename || job.job_id;
  row.querySelector(".name").textContent = called;
  // each button and bar named after its job for a screen reader: the rows are no table, and a
  // batch's were twenty buttons all read as "cancel", twenty as "show"
  row.querySelector(".cancel").setAttribute("aria-label", `cancel ${called}`);
  row.querySelector(".show").setAttribute("aria-label", `show ${called}`);
  row.querySelector(".bar").setAttribute("aria-label", called);
  row.querySelector(".cancel").addEventListener("click", () => cancel(job.job_id));
  row.querySelector(".show").addEventListener("click", () => show(state.jobs.get(job.job_id), true));
  $("#jobs").prepend(row);
  // a job that had ended before a reload is listed, not drawn over what the user looks at
  state.jobs.set(job.job_id, { job, file, row, name, autoShow: !(restored && TERMINAL.has(job.status)) });
  // a comparison or identification under way is the one its panel reports on (after a reload too)
  const panel = PANELS[job.kind];
  if (panel && !TERMINAL.has(job.status)) panel.awaiting = job.job_id;
  if (!followed().includes(job.job_id)) setFollowed([...followed(), job.job_id]);
  poll(job.job_id);
}

async function restoreFollowed() {
  const epoch = keyEpoch;
  for (const id of followed()) {
    if (state.jobs.has(id)) continue;
    try {
      const job = await (await api(`/jobs/${encodeURIComponent(id)}`)).json();
      if (epoch !== keyEpoch) return;
      track(job, null, true);
    } catch (err) {
      if (epoch !== keyEpoch) return;
      // gone (expired, or another key's): no longer followed; anything else is tried next load
      if (err.status === 404) setFollowed(followed().filter((x) => x !== id));
    }
  }
}

async function poll(jobId) {
  const entry = state.jobs.get(jobId);
  if (!entry) return; // no longer followed (the key changed)
  try {
    const job = await (await api(`/jobs/${jobId}`)).json();
    if (state.jobs.get(jobId) !== entry) return;
    entry.job = job;
  } catch (err) {
    if (state.jobs.get(jobId) !== entry) return;
    entry.row.querySelector(".step").textContent = err.message;
    // no faster than a reading that succeeds: every followed job asked every 2 s while the
    // service was down (a batch of 200, 100 requests a second at a restarting service)
    if (err.status !== 404) setTimeout(() => poll(jobId), Math.max(2000, pollEvery()));
    return;
  }
  render(entry);
  if (!TERMINAL.has(entry.job.status)) {
    setTimeout(() => poll(jobId), pollEvery());
  } else if (entry.job.status === "succeeded" && entry.autoShow && showsByItself(entry.job)) {
    show(entry);
  }
}

// How long a followed job waits for its next reading: 0.5 s while the tab follows a few unfinished
// jobs, longer the more it follows (up to 5 s), so the tab asks about 8 times a second in all. Each
// was read every 0.5 s however many: a batch of 200 was 400 requests a second from one tab, on
// the browser's six connections to the service, ahead of the lists and the next file's upload.
function pollEvery() {
  let open = 0;
  for (const { job } of state.jobs.values()) if (!TERMINAL.has(job.status)) open += 1;
  return Math.min(500 * Math.max(1, Math.ceil(open / 4)), 5000);
}

// A finished job is shown by itself where it draws over nothing the user looks at: the timeline
// of no other job; the answer in its panel that the panel waits for (the latest submitted).
function showsByItself(job) {
  const panel = PANELS[job.kind];
  if (panel) return panel.awaiting === job.job_id || panel.shown === null;
  return job.kind === "diarize" && (!state.shown || state.shown.job.job_id === job.job_id);
}

function render({ job, row, name }) {
  row.dataset.status = job.status;
  const step = stepText(job);
  row.querySelector(".step").textContent = step;
  updateRecentRow(job);
  const done = TERMINAL.has(job.status) ? 100 : Math.round(job.progress * 100);
  row.querySelector(".bar > div").style.width = `${done}%`;
  row.querySelector(".bar").setAttribute("aria-valuenow", String(done));
  row.querySelector(".cancel").hidden = TERMINAL.has(job.status);
  row.querySelector(".show").hidden = job.status !== "succeeded" || !(job.kind in VIEWS);
  const panel = PANELS[job.kind];
  if (panel && panel.awaiting === job.job_id) {
    // the panel says how its job goes, where the user submitted it (the job's row is further up)
    panel.status.textContent = TERMINAL.has(job.status) ? "" : `${name || job.filename || ""}: ${step}`;
    if (job.status === "failed") panel.error.textContent = `${name || job.filename || job.job_id}: ${(job.error || {}).detail || "failed"}`;
    if (job.status === "cancelled") panel.error.textContent = `${name || job.filename || job.job_id}: cancelled`;
  }
}

// What the page shows of one key's jobs, forgotten when the key changes: the jobs this tab follows
// (their rows, names and ids kept for a reload), the timeline and the answers shown, the messages.
// The new key's lists are read afresh. Before, the previous key's job names, timeline, speaker names
// and downloads stayed on the page under the new key, and its jobs were polled with the new key.
function forgetKeysJobs() {
  for (const { row } of state.jobs.values()) row.remove();
  state.jobs.clear();
  setFollowed([]);
  state.shown = null;
  state.lanes = null;
  state.drawn = null;
  $("#result-panel").hidden = true;
  $("#result-title").textContent = "Result";
  $("#timeline").replaceChildren();
  $("#summary").textContent = "";
  turnsShown = { turns: [], next: 0, names: new Map() };
  $("#turns tbody").replaceChildren();
  $("#turns-more").hidden = true;
  if (audio.src) URL.revokeObjectURL(audio.src);
  audio.removeAttribute("src");
  delete audio.dataset.jobId;
  audio.load();
  for (const panel of Object.values(PANELS)) {
    panel.awaiting = null;
    panel.shown = null;
    panel.status.textContent = "";
    panel.error.textContent = "";
    panel.answer.replaceChildren();
    panel.answer.hidden = true;
  }
  chosen.clear();
  for (const id of ["#submit-error", "#vp-error", "#download-error"]) $(id).textContent = "";
  // the lists too, at once: the new key's come back in a request's time (seconds on a loaded
  // service), and meanwhile the previous key's rows took a "follow" or a "show" under the new key
  for (const id of ["#recent tbody", "#voiceprints tbody", "#id-voiceprints"]) $(id).replaceChildren();
}

async function cancel(jobId) {
  try {
    await api(`/jobs/${jobId}/cancel`, { method: "POST" });
  } catch (err) {
    // in the job's row, where "cancel" was clicked (the next reading of the job overwrites it)
    const entry = state.jobs.get(jobId);
    if (entry) entry.row.querySelector(".step").textContent = `cancel: ${err.message}`;
  }
}

// --- the speaker timeline ----------------------------------------------------------------------
const audio = $("#audio");

// a finished job's result, where its kind shows it; reveal: brought into view (a "show" clicked
// in a list below the panel)
function show(entry, reveal = false) {
  const view = VIEWS[entry.job.kind];
  if (view) view(entry, reveal);
}

// What pandas reads as a missing value, after which the RTTM download writes a "_"
// (shared/formats.py, _READ_AS_MISSING)
const READ_AS_MISSING = new Set(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
  "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]);

// a name as the downloads write it (shared/formats.py, _written): two names alike there are one
function written(name) {
  const field = name.replace(/-[ -]+>/g, "->").split(/\s+/).filter(Boolean).join("_").replace(/"/g, "'");
  return READ_AS_MISSING.has(field) ? `${field}_` : field;
}

// Each speaker's name, no two speakers under one, as the RTTM/SRT/WebVTT downloads name them
// (shared/formats.py, _distinct_names): a speaker under its own diarization label keeps it; a
// named one keeps its voiceprint's label unless a speaker before it has it, and is then
// "label (SPEAKER_xx)". Two voiceprints labelled "Alex" showed two lanes and two sets of turns
// under one name, where the downloads told them apart.
function distinctNames(speakers, names) {
  const holder = new Map();
  const chosen = new Array(speakers.length);
  const order = speakers.map((_, i) => i);
  order.sort((a, b) => (names[a] !== speakers[a]) - (names[b] !== speakers[b]) || a - b);
  for (const i of order) {
    let name = names[i], n = 1;
    while ((holder.get(written(name)) ?? speakers[i]) !== speakers[i]) {
      n += 1;
      name = `${names[i]} (${speakers[i]})` + (n > 2 ? ` ${n - 1}` : "");
    }
    holder.set(written(name), speakers[i]);
    chosen[i] = name;
  }
  return chosen;
}

function showTimeline(entry, reveal = false) {
  state.shown = entry;
  const result = entry.job.result;
  const turns = result.diarization_results;
  // one pass over the turns, in a loop rather than spread into Math.max: a day's recording has
  // hundreds of thousands of turns, past the most arguments a call may take (the page threw
  // "Maximum call stack size exceeded" and showed nothing)
  const bySpeaker = new Map();
  let duration = Math.max(result.audio_duration || 0, 1);
  for (const t of turns) {
    if (!bySpeaker.has(t.speaker)) bySpeaker.set(t.speaker, []);
    bySpeaker.get(t.speaker).push(t);
    if (t.end > duration) duration = t.end;
  }
  const speakers = [...bySpeaker.keys()];
  const named = distinctNames(speakers, speakers.map((s) => bySpeaker.get(s).find((t) => t.identity)?.identity || s));
  $("#result-panel").hidden = false;
  $("#result-title").textContent = `Who spoke when: ${entry.job.filename || entry.job.job_id}`;
  if (entry.file) {
    if (audio.dataset.jobId !== entry.job.job_id) {
      if (audio.src) URL.revokeObjectURL(audio.src);
      audio.src = URL.createObjectURL(entry.file);
      audio.dataset.jobId = entry.job.job_id;
    }
  } else {
    // no longer any job's: left marked as the job shown before, "show" on that job again set no
    // source (the same job, it seemed), and its turns played nothing
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.removeAttribute("src");
    delete audio.dataset.jobId;
  }
  $("#no-audio").hidden = Boolean(entry.file);
  $("#download-error").textContent = "";
  $("#play-file").value = "";
  state.duration = duration;
  const timeline = $("#timeline");
  timeline.innerHTML = "";
  timeline.scrollLeft = 0;
  const lanes = document.createElement("div");
  lanes.className = "lanes";
  state.lanes = speakers.map((speaker, i) => {
    const own = bySpeaker.get(speaker).slice().sort((a, b) => a.start - b.start);
    const lane = document.createElement("div");
    lane.className = "lane";
    lane.dataset.speaker = speaker;
    // its colour, and past the palette a pattern of its own: speakers 11 to 20 have the
    // palette's colours striped, and so on (10 x 10 looks, num_speakers goes up to 100); with one
    // colour per 10 speakers, lanes 1, 11, 21 looked alike
    lane.style.setProperty("--colour", COLOURS[i % COLOURS.length]);
    lane.dataset.pattern = String(Math.floor(i / COLOURS.length) % PATTERNS);
    const name = named[i];
    lane.innerHTML = `<div class="lane-label"><span class="swatch" aria-hidden="true"></span><span class="lane-name"></span></div><div class="track"></div>`;
    lane.querySelector(".lane-name").textContent = name;
    lane.querySelector(".lane-label").title = name;
    lanes.appendChild(lane);
    let longest = 0;
    for (const t of own) longest = Math.max(longest, t.end - t.start);
    return { name, turns: own, longest, track: lane.querySelector(".track") };
  });
  const cursor = document.createElement("div");
  cursor.className = "cursor";
  lanes.appendChild(cursor);
  timeline.appendChild(lanes);
  const seconds = speakers.map((s) => bySpeaker.get(s).reduce((a, t) => a + t.end - t.start, 0));
  if (!turns.length) {
    // no speech found (silence, music, a tone): the timeline was an empty box and the summary
    // "0 speakers, 0 turns, 12.0 s; ", cut short, as if the page had failed to draw the result
    const heard = (result.audio_duration || 0).toFixed(1);
    const none = document.createElement("p");
    none.className = "no-speech hint";
    none.textContent = "No speech found in this recording.";
    timeline.insertBefore(none, lanes);
    $("#summary").textContent = `No speech found in ${heard} s of audio: no speaker, no turn.`;
  } else {
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    $("#summary").textContent = `${plural(speakers.length, "speaker")}, ${plural(turns.length, "turn")}, ` +
      `${duration.toFixed(1)} s; ` + speakers.map((s, i) => `${named[i]} ${seconds[i].toFixed(1)} s`).join(", ");
  }
  layout();
  listTurns(turns, speakers, named);
  if (reveal) {
    // "show" is clicked in a list below (Recent jobs, the page's last panel): the timeline was drawn
    // out of sight and on a phone nothing seemed to happen. The focus moves with the view, so the
    // keyboard goes on from the result (its player and downloads), not from the list.
    $("#result-panel").scrollIntoView({ block: "start" });
    $("#result-title").focus({ preventScroll: true });
  }
}

// The turns as a table, in time order, each with a button that plays it: the timeline's bars are
// for the mouse, and a keyboard or a screen reader reached none of them. A day's recording has
// hundreds of thousands of turns: they are listed TURNS_PAGE at a time ("more").
const TURNS_PAGE = 500;
let turnsShown = { turns: [], next: 0, names: new Map() };

function clock(seconds) {
  const s = Math.max(seconds, 0);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = (s % 60).toFixed(1).padStart(4, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

function listTurns(turns, speakers, named) {
  const names = new Map(speakers.map((s, i) => [s, named[i]]));
  const ordered = turns.slice().sort((a, b) => a.start - b.start || a.end - b.end);
  turnsShown = { turns: ordered, next: 0, names };
  $("#turns tbody").innerHTML = "";
  $("#turns-list summary").textContent = `Turns, one a line (${ordered.length})`;
  moreTurns();
}

function moreTurns() {
  const { turns, names } = turnsShown;
  const body = document.createDocumentFragment();
  const end = Math.min(turnsShown.next + TURNS_PAGE, turns.length);
  for (let i = turnsShown.next; i < end; i++) {
    const t = turns[i];
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td><td></td><td><button type=\"button\" class=\"small play\">play</button></td>";
    const cells = tr.querySelectorAll("td");
    cells[0].textContent = clock(t.start);
    cells[1].textContent = clock(t.end);
    cells[2].textContent = names.get(t.speaker) || t.speaker;
    const button = tr.querySelector("button");
    button.dataset.start = t.start;
    button.dataset.end = t.end;
    button.setAttribute("aria-label", `play ${cells[2].textContent} from ${cells[0].textContent} to ${cells[1].textContent}`);
    body.appendChild(tr);
  }
  $("#turns tbody").appendChild(body);
  turnsShown.next = end;
  $("#turns-more").hidden = end >= turns.length;
}
$("#turns-more").addEventListener("click", moreTurns);
$("#turns").addEventListener("click", (event) => {
  const button = event.target.closest("button.play");
  if (!button) return;
  if (!audio.src) {
    $("#no-audio").hidden = false;
    $("#play-file").focus();
    return;
  }
  playTurn({ start: Number(button.dataset.start), end: Number(button.dataset.end) });
});

// The recording of a job shown without it (after a reload, or from Recent jobs): opened here, it
// plays with the timeline. The hint said to pick it "above", where a file is queued for a new job
// instead: nothing played, and Submit ran the recording again.
$("#play-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file || !state.shown) return;
  state.shown.file = file;
  if (audio.src) URL.revokeObjectURL(audio.src);
  audio.src = URL.createObjectURL(file);
  audio.dataset.jobId = state.shown.job.job_id;
  $("#no-audio").hidden = true;
});

// one listener for every turn (a day's recording draws hundreds of thousands of them)
$("#timeline").addEventListener("click", (event) => {
  const el = event.target.closest(".turn");
  if (el) playTurn({ start: Number(el.dataset.start), end: Number(el.dataset.end) });
});

// soon: the turns drawn in the next frame, once for all the zoom steps and resizes before it (a
// slider dragged across sends one step after another, each drawn in turn before)
function layout(soon = false) {
  // at zoom 1 the whole recording fits the panel; each step of the slider adds detail
  const timeline = $("#timeline");
  if (!state.shown) return;
  const fit = Math.max(timeline.clientWidth - LANE_LABEL_PX - 2, 100) / state.duration;
  state.pxPerSecond = fit * Number($("#zoom").value);
  const width = state.duration * state.pxPerSecond;
  timeline.querySelectorAll(".track").forEach((track) => { track.style.width = `${width}px`; });
  if (soon) redrawSoon(); else drawTurns();
  moveCursor();
}

// The turns are drawn for what is in view and half a view's width either side, and where a
// speaker has more turns there than one per 4 px, those less than a pixel apart are one bar (its
// title says how many): one element per turn, all of them placed again at each step of the zoom,
// took 7.5 s to show a day's 100,000 turns and 1.7 s a zoom step, the page frozen meanwhile. The
// bars drawn are then bounded by the pixels in view, whatever the recording's length.
const PATTERNS = 10; // app.css: .lane[data-pattern]
function drawTurns() {
  const timeline = $("#timeline");
  if (!state.lanes) return;
  const pps = state.pxPerSecond;
  const view = Math.max(timeline.clientWidth - LANE_LABEL_PX, 100);
  const from = (timeline.scrollLeft - view / 2) / pps, to = (timeline.scrollLeft + 1.5 * view) / pps;
  state.drawn = { from, to };
  for (const lane of state.lanes) {
    const { turns } = lane;
    // the first turn that may reach into the range: by start, less the lane's longest turn
    let lo = 0, hi = turns.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (turns[mid].start < from - lane.longest) lo = mid + 1; else hi = mid;
    }
    let end = lo, top = turns.length;
    while (end < top) {
      const mid = (end + top) >> 1;
      if (turns[mid].start <= to) end = mid + 1; else top = mid;
    }
    // a lane with fewer turns in range than one per 4 px draws each (a meeting's, at any zoom);
    // only a denser one draws turns less than a pixel apart as one bar
    const merge = end - lo > ((to - from) * pps) / 4;
    const bars = document.createDocumentFragment();
    let bar = null;
    for (let i = lo; i < end; i++) {
      const t = turns[i];
      if (t.end < from) continue;
      if (bar && merge && (t.start - bar.end) * pps < 1) {
        bar.end = Math.max(bar.end, t.end);
        bar.count += 1;
        continue;
      }
      if (bar) bars.appendChild(turnBar(bar, pps));
      bar = { start: t.start, end: t.end, count: 1 };
    }
    if (bar) bars.appendChild(turnBar(bar, pps));
    lane.track.replaceChildren(bars);
  }
}

function turnBar(bar, pps) {
  const el = document.createElement("div");
  el.className = "turn";
  el.dataset.start = bar.start;
  el.dataset.end = bar.end;
  el.style.left = `${bar.start * pps}px`;
  el.style.width = `${Math.max((bar.end - bar.start) * pps, 1)}px`;
  if (bar.count > 1) el.dataset.turns = bar.count;
  return el;
}

// a bar's title, written when the pointer first reaches it (thousands are drawn, few pointed at)
$("#timeline").addEventListener("mouseover", (event) => {
  const el = event.target.closest(".turn");
  if (!el || el.title) return;
  const name = el.closest(".lane").querySelector(".lane-name").textContent;
  const span = `${Number(el.dataset.start).toFixed(2)}-${Number(el.dataset.end).toFixed(2)} s`;
  el.title = el.dataset.turns ? `${name}: ${el.dataset.turns} turns, ${span} (zoom in to tell them apart)` : `${name}: ${span}`;
});

let redrawAsked = false;
function redrawSoon() {
  if (redrawAsked) return;
  redrawAsked = true;
  requestAnimationFrame(() => { redrawAsked = false; drawTurns(); });
}
// scrolled past what was drawn: the turns now in view
$("#timeline").addEventListener("scroll", () => {
  const timeline = $("#timeline");
  if (!state.drawn) return;
  const pps = state.pxPerSecond;
  const left = timeline.scrollLeft / pps, right = (timeline.scrollLeft + timeline.clientWidth) / pps;
  if (left < state.drawn.from || right > state.drawn.to) redrawSoon();
});

function moveCursor() {
  const cursor = document.querySelector("#timeline .cursor");
  if (cursor) cursor.style.left = `${LANE_LABEL_PX + audio.currentTime * state.pxPerSecond}px`;
}

let stopAt = null;
function playTurn(turn) {
  if (!audio.src) return;
  audio.currentTime = turn.start;
  stopAt = turn.end;
  // a play cut short by a pause or by the next turn rejects; that is no error to report
  audio.play().catch(() => {});
}

audio.addEventListener("timeupdate", () => {
  if (stopAt !== null && audio.currentTime >= stopAt) { audio.pause(); stopAt = null; }
  moveCursor();
});
audio.addEventListener("seeked", moveCursor);
audio.addEventListener("play", function frame() {
  moveCursor();
  if (!audio.paused) requestAnimationFrame(frame);
});
$("#zoom").addEventListener("input", () => layout(true));
window.addEventListener("resize", () => layout(true));

// --- downloads ---------------------------------------------------------------------------------
document.querySelectorAll(".downloads button").forEach((button) => button.addEventListener("click", async () => {
  const job = state.shown?.job;
  if (!job) return;
  const format = button.dataset.format;
  const said = $("#download-error");
  said.textContent = "";
  let blob;
  try {
    blob = format === "json"
      ? new Blob([JSON.stringify(job.result, null, 2)], { type: "application/json" })
      : await (await api(`/jobs/${job.job_id}/result?format=${format}`)).blob();
  } catch (err) {
    // beside the buttons: in the submit panel's error line, at the top of the page, it was out
    // of sight of the timeline, and the click seemed to do nothing
    if (state.shown?.job === job) said.textContent = `${format.toUpperCase()}: ${err.message}`;
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  // a name that is only dots once its extension is off ("..wav") made ".srt", a hidden file the
  // browser renamed "srt", with no extension: the job's id then
  const stem = (job.filename || "").replace(/\.[^.]+$/, "");
  link.download = `${/[^.\s]/.test(stem) ? stem : job.job_id}.${format}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}));

// --- one answer per job: two voices compared, a voice identified --------------------------------
// Each panel submits its kind's job (POST /jobs/compare, /jobs/identify: the public routes),
// which is followed in "This session's jobs" like any other (progress, cancel, kept across a
// reload); the panel says how it goes and, once it ended, the answer in words.
function threshold(form, input) {
  const value = $(input).value.trim();
  if (value !== "") form.append("threshold", value);
}

function fmt(score) { return score == null ? "none" : Number(score).toFixed(3); }

// one sentence of the answer; text only (file names and labels are the user's own)
function line(parent, text, className) {
  const p = document.createElement("p");
  if (className) p.className = className;
  p.textContent = text;
  parent.appendChild(p);
  return p;
}

function answerIn(kind, entry, reveal) {
  const panel = PANELS[kind];
  panel.shown = entry.job.job_id;
  if (panel.awaiting === entry.job.job_id) panel.status.textContent = "";
  const box = panel.answer;
  box.replaceChildren();
  box.dataset.jobId = entry.job.job_id;
  box.hidden = false;
  if (reveal) box.scrollIntoView({ block: "nearest" });
  return box;
}

function showComparison(entry, reveal) {
  const r = entry.job.result;
  const box = answerIn("compare", entry, reveal);
  box.dataset.verdict = r.same_speaker ? "same" : "different";
  line(box, r.same_speaker ? "Same speaker" : "Different speakers", "verdict");
  line(box, entry.name || entry.job.filename || entry.job.job_id, "what");
  const how = line(box, "", "figures");
  how.append("similarity ");
  const score = document.createElement("b");
  score.className = "score";
  score.textContent = fmt(r.similarity_score);
  how.append(score, r.same_speaker ? " ≥ threshold " : " < threshold ");
  const limit = document.createElement("b");
  limit.className = "threshold";
  limit.textContent = fmt(r.threshold);
  how.append(limit, ` (cosine similarity of the two voices, −1 to 1; ${(r.audio_duration || 0).toFixed(1)} s of audio)`);
}

function showIdentity(entry, reveal) {
  const r = entry.job.result;
  const box = answerIn("identify", entry, reveal);
  const among = `${r.voiceprints} voiceprint${r.voiceprints === 1 ? "" : "s"} compared`;
  if (r.identity != null) {
    box.dataset.verdict = "named";
    line(box, r.identity, "verdict identity");
  } else {
    box.dataset.verdict = r.confidence == null ? "unscored" : "nobody";
    line(box, r.confidence == null ? "Too little speech to tell" : "Nobody enrolled matched", "verdict");
  }
  line(box, entry.name || entry.job.filename || entry.job.job_id, "what");
  const how = line(box, "", "figures");
  if (r.confidence == null) {
    how.append(`${(r.speech_seconds || 0).toFixed(1)} s of speech; threshold ${fmt(r.threshold)}; ${among}`);
  } else {
    how.append(r.identity != null ? "score " : "best score ");
    const score = document.createElement("b");
    score.className = "score";
    score.textContent = fmt(r.confidence);
    how.append(score, r.identity != null ? " ≥ threshold " : " < threshold ");
    const limit = document.createElement("b");
    limit.className = "threshold";
    limit.textContent = fmt(r.threshold);
    how.append(limit, `; ${among}; ${(r.speech_seconds || 0).toFixed(1)} s of speech`);
  }
  if (r.runner_up) line(box, `next closest: ${r.runner_up.label} (${fmt(r.runner_up.score)})`, "runner-up");
}

const VIEWS = { diarize: showTimeline, compare: showComparison, identify: showIdentity };

// submit one job of a panel's kind: its button off while the files go (a second click sent them
// again), upload progress in the panel's status, a refusal in its error line
async function submitAnswer(kind, button, form, name) {
  const panel = PANELS[kind];
  panel.error.textContent = "";
  $(button).disabled = true;
  panel.status.textContent = `uploading ${name}…`;
  const epoch = keyEpoch;
  try {
    const job = await send(`/jobs/${kind}`, form, (done) => {
      if (epoch === keyEpoch) panel.status.textContent = `uploading ${name}: ${Math.floor(done * 100)} %`;
    });
    if (epoch !== keyEpoch) return true; // sent under the previous key: not followed under this one
    panel.answer.hidden = true;
    panel.awaiting = job.job_id;
    panel.status.textContent = `${name}: ${job.status}`;
    track(job, null, false, name);
    refreshRecent();
    return true;
  } catch (err) {
    if (epoch !== keyEpoch) return false;
    panel.status.textContent = "";
    panel.error.textContent = `${name}: ${err.message}`;
    return false;
  } finally {
    $(button).disabled = false;
  }
}

$("#cmp-submit").addEventListener("click", async () => {
  const first = $("#cmp-file1").files[0], second = $("#cmp-file2").files[0];
  if (!first || !second) {
    PANELS.compare.error.textContent = "choose two recordings, one in each field";
    return;
  }
  const form = new FormData();
  form.append("file1", first, first.name);
  form.append("file2", second, second.name);
  threshold(form, "#cmp-threshold");
  if (await submitAnswer("compare", "#cmp-submit", form, `${first.name} and ${second.name}`)) {
    $("#cmp-file1").value = "";
    $("#cmp-file2").value = "";
  }
});

// The voiceprints to identify among: "all" of the key's, or those ticked in this list, which
// mirrors the Known speakers table (its pages, its refreshes). Ticks are kept across a refresh.
const chosen = new Set();
function listChoices(items, first) {
  const list = $("#id-voiceprints");
  if (first) list.replaceChildren();
  if (items === null) return; // the listing failed (its table says why): nothing to choose from
  for (const vp of items) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = vp.id;
    box.checked = chosen.has(vp.id);
    label.append(box, ` ${vp.label}`);
    label.title = vp.id;
    list.appendChild(label);
  }
  if (first && items.length === 0) line(list, "No voiceprints yet: enroll someone under Known speakers.", "hint");
}
$("#id-voiceprints").addEventListener("change", (event) => {
  const box = event.target;
  if (box.type !== "checkbox") return;
  if (box.checked) chosen.add(box.value); else chosen.delete(box.value);
  if (box.checked) document.querySelector("input[name='id-among'][value='some']").checked = true;
});

$("#id-submit").addEventListener("click", async () => {
  const file = $("#id-file").files[0];
  const error = PANELS.identify.error;
  if (!file) {
    error.textContent = "choose a recording of the person";
    return;
  }
  let voiceprints = "all";
  if (document.querySelector("input[name='id-among']:checked").value === "some") {
    const ids = Array.from(document.querySelectorAll("#id-voiceprints input:checked"), (box) => box.value);
    if (ids.length === 0) {
      error.textContent = "tick at least one voiceprint, or choose all";
      return;
    }
    voiceprints = ids.join(",");
  }
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("voiceprints", voiceprints);
  threshold(form, "#id-threshold");
  if (await submitAnswer("identify", "#id-submit", form, file.name)) $("#id-file").value = "";
});

// --- listings a page at a time ----------------------------------------------------------------
// A key may keep thousands of jobs and 10,000 voiceprints: a listing shows its first page, then
// "more" for each next one, whose cursor the answer's Link header names. Only the latest listing
// asked for is shown: a key change, a submit or a deletion starts a new one while another may be
// on its way, and an answer that arrives late must not replace the new list or add to it (it
// would show the previous key's jobs under the new key).
function nextCursor(response) {
  const link = /<([^>]*)>\s*;\s*rel="next"/.exec(response.headers.get("Link") || "");
  return link ? new URL(link[1], location.href).searchParams.get("cursor") : null;
}

const LIST_RETRY_MS = 5000;

// onPage(items, first): told of each page shown (the identify panel's list of voiceprints)
function pagedTable({ path, field, pageSize, table, more, row, onPage = () => {} }) {
  let cursor = null;
  let latest = 0;
  async function load(first) {
    // "more" with no page to follow: a new list is on its way (clicking "more" right after typing a
    // key changes the key first, as the field loses focus) or this was the last page
    if (!first && cursor === null) return;
    const body = $(`${table} tbody`);
    const mine = ++latest;
    const params = new URLSearchParams({ limit: String(pageSize) });
    if (!first) params.set("cursor", cursor);
    // hidden while a page loads: a second click would ask for the same page again
    cursor = null;
    $(more).hidden = true;
    let next = null;
    try {
      const response = await api(`${path}?${params}`);
      const items = (await response.json())[field];
      if (mine !== latest) return;
      if (first) body.innerHTML = "";
      for (const item of items) body.appendChild(row(item));
      onPage(items, first);
      next = nextCursor(response);
    } catch (err) {
      if (mine !== latest) return;
      body.innerHTML = `<tr><td colspan="5" class="error"></td></tr>`;
      body.querySelector("td").textContent = err.message;
      if (first) onPage(null, true);
      // the service gone (a restart, a deploy): read again every 5 s until it answers, unless
      // another listing began meanwhile. The list said "did not answer" after the service was
      // back, while the jobs followed above it had moved on, until "refresh" was clicked.
      if (err.network) {
        const again = () => {
          if (mine !== latest) return;
          if (document.hidden) setTimeout(again, LIST_RETRY_MS); else load(true);
        };
        setTimeout(again, LIST_RETRY_MS);
      }
    }
    cursor = next;
    $(more).hidden = cursor === null;
  }
  $(more).addEventListener("click", () => load(false));
  return () => load(true);
}

// --- recent jobs (this key's, from the service) -------------------------------------------------
// A row says the job as it was listed; rowState tells whether a newer reading changes it.
const rowState = (job) => `${job.status} ${job.step || ""} ${Math.round((job.progress || 0) * 100)}`;

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.innerHTML = "<td></td><td></td><td></td><td></td><td></td>";
  fillJobRow(tr, job);
  return tr;
}

// a Recent row's job as its buttons are named for a screen reader: its file (or id) and when
// it was submitted, since one file may be sent twice
const jobCalled = (job) => `${job.filename || job.job_id} of ${job.created_at.replace("T", " ").slice(0, 19)}`;

// The listing a row was last filled from: what "follow" starts from
const rowJobs = new WeakMap();

// A row is filled in place when its job moves on, its buttons kept where they still apply: a row
// replaced under the pointer took the click that was on its way to "follow" or "show" with it.
function fillJobRow(tr, job) {
  rowJobs.set(tr, job);
  tr.dataset.jobId = job.job_id;
  tr.dataset.status = job.status;
  tr.dataset.state = rowState(job);
  const cells = tr.querySelectorAll("td");
  cells[0].textContent = job.created_at.replace("T", " ").slice(0, 19);
  cells[1].textContent = job.kind;
  cells[2].textContent = job.filename || "";
  cells[3].textContent = stepText(job);
  const follow = cells[4].querySelector("button.follow");
  if (!TERMINAL.has(job.status) && !state.jobs.has(job.job_id)) {
    // a job this tab did not submit (another tab's, a script's): followed here on request, with
    // its progress and its cancel button
    if (!follow) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "small follow";
      button.textContent = "follow";
      button.setAttribute("aria-label", `follow ${jobCalled(job)}`);
      button.addEventListener("click", () => { button.remove(); track(rowJobs.get(tr), null); });
      cells[4].appendChild(button);
    }
  } else if (follow) {
    follow.remove();
  }
  if (job.status === "succeeded" && job.kind in VIEWS && !cells[4].querySelector("button.show")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small show";
    button.textContent = "show";
    button.setAttribute("aria-label", `show ${jobCalled(job)}`);
    // the list carries no results (GET /jobs is a summary): the record is fetched when shown
    button.addEventListener("click", async () => {
      const entry = state.jobs.get(job.job_id);
      const epoch = keyEpoch;
      try {
        const full = await (await api(`/jobs/${job.job_id}`)).json();
        if (epoch !== keyEpoch) return;
        if (entry) entry.job = full;
        show(entry || { job: full, file: null, name: null }, true);
      } catch (err) {
        if (epoch !== keyEpoch) return;
        // in the row clicked (the page's last panel): in the submit panel's error line, at the top
        // of the page, it was out of sight, and nothing seemed to happen
        const said = document.createElement("span");
        said.className = "error";
        said.textContent = err.message;
        cells[3].replaceChildren(said);
      }
    });
    cells[4].appendChild(button);
  }
}

const refreshRecent = pagedTable({ path: "/jobs", field: "jobs", pageSize: 20, table: "#recent",
                                   more: "#recent-more", row: jobRow });
$("#refresh").addEventListener("click", refreshRecent);

function updateRecentRow(job) {
  const tr = $(`#recent tbody tr[data-job-id="${CSS.escape(job.job_id)}"]`);
  if (tr && tr.dataset.state !== rowState(job)) fillJobRow(tr, job);
}

// Recent jobs keep up by themselves while one they show is unfinished: each status was read once,
// so a batch a script submitted stayed "queued" on the page until "refresh" was clicked. One
// listing a round (the newest 100 of the key's jobs) updates the rows in place: no page of "more"
// is lost and nothing moves under the pointer; new jobs wait for "refresh".
const RECENT_EVERY_MS = 5000;
let recentBusy = false;
async function updateRecent() {
  const open = [...document.querySelectorAll("#recent tbody tr[data-job-id]")]
    .some((tr) => !TERMINAL.has(tr.dataset.status));
  if (!open || recentBusy || document.hidden) return;
  recentBusy = true;
  try {
    for (const job of (await (await api("/jobs?limit=100")).json()).jobs) updateRecentRow(job);
  } catch (_) {
    // the next round asks again; "refresh" says what went wrong
  } finally {
    recentBusy = false;
  }
}
setInterval(updateRecent, RECENT_EVERY_MS);

// --- voiceprints: enroll a person, list and delete them ------------------------------------------
function voiceprintRow(vp) {
  const tr = document.createElement("tr");
  tr.dataset.voiceprintId = vp.id;
  tr.innerHTML = "<td></td><td></td><td></td><td></td><td></td>";
  const cells = tr.querySelectorAll("td");
  cells[0].textContent = vp.label;
  cells[1].textContent = vp.speech_seconds == null ? "" : `${vp.speech_seconds.toFixed(1)} s`;
  cells[2].textContent = vp.files == null ? "imported" : String(vp.files);
  cells[3].textContent = vp.model;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small";
  button.textContent = "delete";
  button.setAttribute("aria-label", `delete the voiceprint of ${vp.label}`);
  button.addEventListener("click", async () => {
    // deleting cannot be undone (enrolling again needs the recordings): one stray click took a
    // person out of every identification
    if (!window.confirm(`Delete the voiceprint of ${vp.label}? Identification will no longer name them.`)) return;
    try { await api(`/voiceprints/${vp.id}`, { method: "DELETE" }); } catch (err) { $("#vp-error").textContent = err.message; }
    refreshVoiceprints();
  });
  cells[4].appendChild(button);
  return tr;
}

const refreshVoiceprints = pagedTable({ path: "/voiceprints", field: "voiceprints", pageSize: 100,
                                        table: "#voiceprints", more: "#vp-more", row: voiceprintRow,
                                        onPage: listChoices });

$("#vp-enroll").addEventListener("click", async () => {
  $("#vp-error").textContent = "";
  const files = Array.from($("#vp-files").files);
  const label = $("#vp-label").value.trim();
  if (!label || files.length === 0) {
    $("#vp-error").textContent = "a name and at least one recording are needed";
    return;
  }
  const form = new FormData();
  form.append("label", label);
  for (const file of files) form.append("files", file, file.name);
  const button = $("#vp-enroll");
  button.disabled = true;
  button.textContent = "enrolling…";
  try {
    // sent as the other uploads are (send): its progress on the button, and leaving the page while
    // it goes asks first; by fetch it said "enrolling…" for the minutes a few long recordings take
    // to send, and a reload dropped them unasked
    await send("/voiceprints", form, (done) => {
      button.textContent = done < 1 ? `sending ${Math.floor(done * 100)} %` : "enrolling…";
    });
    $("#vp-label").value = "";
    $("#vp-files").value = "";
  } catch (err) {
    $("#vp-error").textContent = err.message;
  } finally {
    button.disabled = false;
    button.textContent = "Enroll";
  }
  refreshVoiceprints();
});

refreshRecent();
refreshVoiceprints();
restoreFollowed();
