// kiln's pages work without this script; it adds live updates (Server-Sent Events) and
// loading earlier log output on scroll-up.
"use strict";
(function () {
  const COLORS = ["#000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5"];
  const BRIGHT = ["#666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#fff"];
  const esc = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  // One line of output with ANSI SGR colours as spans (other escapes dropped).
  function ansi(line) {
    let out = "", open = 0, style = {};
    const parts = line.replace(/\r$/, "").split(/\x1b\[([0-9;]*)([A-Za-z])/);
    for (let i = 0; i < parts.length; i += 3) {
      if (parts[i]) out += esc(parts[i]);
      if (i + 2 >= parts.length || parts[i + 2] !== "m") continue;
      const codes = parts[i + 1] === "" ? [0] : parts[i + 1].split(";").map(Number);
      for (let k = 0; k < codes.length; k++) {
        const c = codes[k];
        if (c === 0) style = {};
        else if (c === 1) style.bold = true;
        else if (c === 22) delete style.bold;
        else if (c >= 30 && c <= 37) style.fg = COLORS[c - 30];
        else if (c >= 90 && c <= 97) style.fg = BRIGHT[c - 90];
        else if (c === 39) delete style.fg;
        else if (c >= 40 && c <= 47) style.bg = COLORS[c - 40];
        else if (c === 49) delete style.bg;
        else if ((c === 38 || c === 48) && codes[k + 1] === 5) k += 2;
        else if ((c === 38 || c === 48) && codes[k + 1] === 2) k += 4;
      }
      out += "</span>".repeat(open); open = 0;
      const css = (style.fg ? "color:" + style.fg + ";" : "") + (style.bg ? "background:" + style.bg + ";" : "") + (style.bold ? "font-weight:bold;" : "");
      if (css) { out += '<span style="' + css + '">'; open = 1; }
    }
    return out + "</span>".repeat(open);
  }

  function lineSpan(job, n, text, isOpen) {
    const s = document.createElement("span");
    s.className = isOpen ? "line open" : "line";
    if (n !== null) { s.id = "L" + job + "-" + n; s.dataset.n = n; }
    s.innerHTML = ansi(text);
    return s;
  }

  // How many lines a followed log keeps on the page: older ones are dropped from the top (and
  // fetched again on scroll-up), so a job printing megabytes a second keeps the page fast.
  const MAX_LINES = 3000;

  // Appends a chunk of a log (`from`: its offset in the stored log), once per animation frame
  // whatever the number of chunks that came: completes the open line, adds whole lines, keeps
  // the rest open. A line that starts a chunk remembers the chunk's offset (`data-off`): the
  // log can be cut there and read again from there.
  function append(pre, text, from) {
    if (!text) return;
    (pre._queue || (pre._queue = [])).push({ text, from });
    if (pre._scheduled) return;
    pre._scheduled = true;
    const run = () => { if (pre._scheduled) { pre._scheduled = false; clearTimeout(pre._timer); flush(pre); } };
    requestAnimationFrame(run);
    // A hidden page gets no animation frames: then at most every 100 ms.
    pre._timer = setTimeout(run, 100);
  }

  function flush(pre) {
    const chunks = pre._queue;
    pre._queue = [];
    const job = pre.dataset.jobId;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    const last = pre.lastElementChild;
    if (last && last.classList.contains("open")) { last.remove(); pre.lastChild && pre.lastChild.nodeType === 3 && pre.lastChild.remove(); }
    let pending = pre.dataset.pending || "";
    // Where the open line starts, when that is a chunk's start.
    let openOff = pre._openOff;
    let n = Number(pre.dataset.nextLine || 1);
    const frag = document.createDocumentFragment();
    for (const c of chunks) {
      if (pending === "") openOff = c.from;
      const lines = (pending + c.text).split("\n");
      pending = lines.pop();
      for (const l of lines) {
        const s = lineSpan(job, n++, l, false);
        if (openOff !== undefined) s.dataset.off = openOff;
        openOff = undefined;
        frag.appendChild(s);
      }
    }
    if (pending) frag.appendChild(lineSpan(job, n, pending, true));
    pre._openOff = openOff;
    pre.dataset.pending = pending;
    pre.dataset.nextLine = n;
    pre.appendChild(frag);
    if (atBottom) {
      trim(pre);
      pre.scrollTop = pre.scrollHeight;
    }
  }

  // Drops the oldest lines of a followed log beyond MAX_LINES (only while its reader is at the
  // bottom). The log is cut at a line that starts a chunk when one is at or after the bound:
  // earlier output is read again from that chunk's offset (`start`). A chunk longer than the
  // bound (the server sends what piled up, and one pipe read may hold thousands of short lines)
  // is cut at the bound all the same: its lines above the cut are kept aside (`_cut`, at most
  // one chunk of text, off the document) and put back first on scroll-up, and earlier output
  // is read from the chunk's start.
  function trim(pre) {
    const spans = pre.querySelectorAll(":scope > span.line");
    const k = spans.length - MAX_LINES;
    if (k <= 0) return;
    let c = k;
    while (c < spans.length - 1 && spans[c].dataset.off === undefined) c++;
    if (c < spans.length - 1) {
      cutBefore(pre, spans[c], null);
      pre._cut = null;
      pre.dataset.start = spans[c].dataset.off;
      return;
    }
    // The line at the bound is inside a chunk: the start of that chunk is the nearest line
    // above with an offset, or else the page's first line (which is at `start`).
    let j = k;
    while (j >= 0 && spans[j].dataset.off === undefined) j--;
    if (j >= 0) {
      cutBefore(pre, spans[j], null);
      pre.dataset.start = spans[j].dataset.off;
      pre._cut = document.createDocumentFragment();
    } else if (!pre._cut) {
      pre._cut = document.createDocumentFragment();
    }
    cutBefore(pre, spans[k], pre._cut);
  }

  // Removes what comes before `first` in `pre`, into `keep` when given.
  function cutBefore(pre, first, keep) {
    while (pre.firstChild && pre.firstChild !== first) {
      if (keep) keep.appendChild(pre.firstChild); else pre.firstChild.remove();
    }
  }

  // Follows a job's log from the offset the page was rendered up to: the server replays what
  // is stored from there, then sends new output; each chunk says where it starts, so a chunk
  // that is not the next one is never shown twice and a gap makes us reconnect from our offset.
  // Browsers open at most 6 HTTP/1.1 connections to a host: follow a few logs at once (the
  // others wait their turn), leaving room for /events and fetches.
  const MAX_FOLLOWED = 3;
  let followed = 0;
  const waiting = [];
  function follow(pre) {
    if (pre.dataset.following) return;
    pre.dataset.following = "1";
    if (followed >= MAX_FOLLOWED) { waiting.push(pre); return; }
    followed++;
    const job = pre.dataset.jobId;
    let es = null;
    const connect = () => {
      const url = "/jobs/" + job + "/log/events?offset=" + pre.dataset.offset + "&attempt=" + (pre.dataset.attempt || 0);
      es = new EventSource(url);
      es.addEventListener("chunk", (e) => {
        const d = JSON.parse(e.data);
        const at = Number(pre.dataset.offset);
        if (d.from !== at) {
          if (d.next > at) { es.close(); setTimeout(connect, 500); }
          return;
        }
        append(pre, d.text, d.from);
        pre.dataset.offset = d.next;
      });
      es.addEventListener("end", () => {
        es.close();
        pre.dataset.live = "false";
        followed--;
        const next = waiting.shift();
        if (next) { delete next.dataset.following; follow(next); }
      });
    };
    connect();
  }

  // Loads the part of a log before what is shown (scroll-up, or the "Earlier output" link).
  async function earlier(pre) {
    if (pre._cut) {
      // The lines of a long chunk cut off at the bound come back first, without a fetch.
      const h = pre.scrollHeight;
      pre.insertBefore(pre._cut, pre.firstChild);
      pre._cut = null;
      pre.scrollTop += pre.scrollHeight - h;
      return;
    }
    const start = Number(pre.dataset.start);
    if (!start || pre.dataset.loading) return;
    pre.dataset.loading = "1";
    try {
      const r = await fetch("/api/jobs/" + pre.dataset.jobId + "/log?before=" + start + "&len=262144&attempt=" + (pre.dataset.attempt || 0), { credentials: "same-origin" });
      if (!r.ok) return;
      const d = await r.json();
      const head = pre.firstElementChild;
      const frag = document.createDocumentFragment();
      let n = d.first_line, rest = d.text, partial = d.starts_mid_line;
      let i;
      while ((i = rest.indexOf("\n")) >= 0) {
        const s = lineSpan(pre.dataset.jobId, partial ? null : n, rest.slice(0, i), false);
        if (partial) { s.classList.add("partial"); s.dataset.n = n; partial = false; }
        n++;
        frag.appendChild(s);
        frag.appendChild(document.createTextNode("\n"));
        rest = rest.slice(i + 1);
      }
      if (rest && head && head.classList.contains("partial")) {
        // The shown part started in the middle of this line: complete it.
        const whole = lineSpan(pre.dataset.jobId, partial ? null : n, "", head.classList.contains("open"));
        whole.innerHTML = ansi(rest) + head.innerHTML;
        if (partial) { whole.classList.add("partial"); whole.dataset.n = n; }
        head.replaceWith(whole);
      } else if (rest) {
        frag.appendChild(lineSpan(pre.dataset.jobId, null, rest, false));
        frag.appendChild(document.createTextNode("\n"));
      }
      const h = pre.scrollHeight;
      pre.insertBefore(frag, pre.firstChild);
      pre.scrollTop += pre.scrollHeight - h;
      pre.dataset.start = d.offset;
      if (!d.offset) document.querySelectorAll('#job-' + pre.dataset.jobId + ' a.earlier').forEach((a) => a.remove());
    } finally { delete pre.dataset.loading; }
  }

  function setState(el, state) {
    if (!el) return;
    // A final state is never left: a read-back answered before an event it crossed must not
    // put an ended build or job back to running.
    if (FINAL.includes(el.dataset.state) && !FINAL.includes(state)) return;
    el.dataset.state = state;
    const pill = el.matches(".pill") ? el : el.querySelector(".job-state, td.state .pill");
    const cell = el.querySelector && el.querySelector("td.state");
    if (cell && !cell.querySelector(".pill")) cell.textContent = state;
    if (pill) { pill.textContent = state; pill.className = pill.className.replace(/state-\S+/, "state-" + state); }
  }

  const FINAL = ["passed", "failed", "cancelled", "timed_out", "errored", "skipped"];

  // A branch's newest build in the branches table (`heads`): a build newer than the row of its
  // branch replaces it, a build on a branch not listed adds one; either goes to the top.
  function head(b) {
    const heads = document.getElementById("heads");
    if (!heads || !b.branch) return;
    const rows = Array.from(heads.tBodies[0].rows);
    const old = rows.find((tr) => tr.dataset.repo === b.repo && tr.dataset.branch === b.branch);
    if (old && Number(old.dataset.headOf) >= b.id) return;
    const tr = document.createElement("tr");
    tr.dataset.headOf = b.id; tr.dataset.state = b.state; tr.dataset.repo = b.repo; tr.dataset.branch = b.branch;
    const badge = "/badge/" + encodeURIComponent(b.repo) + "/" + b.branch.split("/").map(encodeURIComponent).join("/") + ".svg";
    tr.innerHTML = "<td>" + esc(b.repo) + "</td><td>" + esc(b.branch) + '</td><td><a href="/builds/' + b.id + '">#' + b.id + "</a></td>"
      + '<td class="state"><span class="pill state-' + esc(b.state) + '">' + esc(b.state) + "</span></td>"
      + '<td><img alt="' + esc(b.state) + '" src="' + esc(badge) + '"></td>';
    if (old) old.remove();
    heads.tBodies[0].insertBefore(tr, heads.tBodies[0].firstChild);
    const section = document.getElementById("branches");
    if (section) section.hidden = false;
  }

  function buildRow(b) {
    const tr = document.createElement("tr");
    tr.dataset.buildId = b.id; tr.dataset.state = b.state;
    const cells = ['<a href="/builds/' + b.id + '">#' + b.id + "</a>", esc(b.state), esc(b.repo), esc(b.branch),
      "<code>" + esc(b.commit.slice(0, 10)) + "</code>", esc(b.trigger), new Date(b.created_at).toISOString().replace("T", " ").slice(0, 19) + "Z", ""];
    cells.forEach((c, k) => { const td = document.createElement("td"); if (k === 1) td.className = "state"; td.innerHTML = c; tr.appendChild(td); });
    return tr;
  }

  // As the server formats durations (kiln-web's time::duration): tenths rounded half up.
  const took = (ms) => ms < 1000 ? ms + "ms" : ms < 60000 ? Math.floor((ms + 50) / 1000) + "." + Math.floor((ms + 50) / 100) % 10 + "s"
    : ms < 3600000 ? Math.floor(ms / 60000) + "m " + Math.floor(ms % 60000 / 1000) + "s"
    : Math.floor(ms / 3600000) + "h " + Math.floor(ms % 3600000 / 60000) + "m";

  // A job ended: its steps' outcomes and durations.
  async function steps(sec, job) {
    const r = await fetch("/api/jobs/" + job, { credentials: "same-origin" });
    if (!r.ok) return;
    const j = await r.json();
    sec.querySelectorAll("table.steps tr.step").forEach((tr, i) => {
      const s = j.steps[i];
      if (!s || !s.outcome) return;
      tr.className = "step outcome-" + s.outcome;
      tr.cells[1].textContent = s.outcome;
      tr.cells[2].textContent = s.duration_ms === null ? "" : took(s.duration_ms);
    });
  }

  // Follows the dispatcher's state changes. `ready` comes once the server has subscribed
  // (also after every reconnect): what changed between the page's rendering and then is read
  // back with `onReady`, so no change is missed.
  function live(onEvent, onReady) {
    const es = new EventSource("/events");
    es.addEventListener("state", (e) => onEvent(JSON.parse(e.data)));
    es.addEventListener("ready", () => { if (onReady) onReady(); });
    es.addEventListener("resync", () => location.reload());
  }

  document.addEventListener("DOMContentLoaded", () => {
    const table = document.getElementById("builds");
    if (table) {
      const show = (b) => {
        const rows = document.querySelectorAll('tr[data-build-id="' + b.id + '"], tr[data-head-of="' + b.id + '"]');
        rows.forEach((tr) => setState(tr, b.state));
        if (b.repo !== undefined) head(b);
        if (table.querySelector('tr[data-build-id="' + b.id + '"]')) return;
        const top = table.tBodies[0].querySelector("tr[data-build-id]");
        if (top && Number(top.dataset.buildId) > b.id) return;
        const f = table.dataset;
        if ((f.repo && f.repo !== b.repo) || (f.branch && f.branch !== b.branch) || (f.filterState && f.filterState !== b.state)) return;
        table.tBodies[0].insertBefore(buildRow(b), table.tBodies[0].firstChild);
      };
      live(async (ev) => {
        if (ev.job_id !== null) return;
        const known = table.querySelector('tr[data-build-id="' + ev.build_id + '"]');
        if (known) { show({ id: ev.build_id, state: ev.state }); return; }
        const r = await fetch("/api/builds/" + ev.build_id, { credentials: "same-origin" });
        if (r.ok) show(await r.json());
      }, async () => {
        // The newest builds as they are now: states that changed, builds that came.
        const q = new URLSearchParams({ limit: "50" });
        const f = table.dataset;
        if (f.repo) q.set("repo", f.repo);
        if (f.branch) q.set("branch", f.branch);
        const r = await fetch("/api/builds?" + q, { credentials: "same-origin" });
        if (!r.ok) return;
        const list = await r.json();
        (list.builds || []).slice().reverse().forEach(show);
      });
    }
    const badge = document.getElementById("build-state");
    if (badge) {
      const id = Number(badge.dataset.buildId);
      live(onState, async () => {
        // The build as it is now: what changed before the subscription.
        const r = await fetch("/api/builds/" + id, { credentials: "same-origin" });
        if (!r.ok) return;
        const b = await r.json();
        (b.jobs || []).forEach((j) => {
          const sec = document.querySelector('section.job[data-job-id="' + j.id + '"]');
          if (sec && sec.dataset.state !== j.state) onState({ build_id: id, job_id: j.id, state: j.state });
        });
        if (badge.dataset.state !== b.state) onState({ build_id: id, job_id: null, state: b.state });
      });
      // The build ended: "Took ... so far" becomes its final duration.
      async function ended() {
        const el = document.getElementById("took");
        if (!el || el.dataset.final) return;
        const r = await fetch("/api/builds/" + id, { credentials: "same-origin" });
        if (!r.ok) return;
        const b = await r.json();
        if (b.finished_at === null || b.finished_at === undefined) return;
        el.textContent = took(Math.max(0, b.finished_at - b.created_at));
        el.dataset.final = "true";
      }
      function onState(ev) {
        if (ev.build_id !== id) return;
        if (ev.job_id === null) {
          setState(badge, ev.state);
          const fin = FINAL.includes(ev.state);
          const c = document.getElementById("cancel"), r = document.getElementById("retry");
          if (c) c.disabled = fin;
          if (r) r.disabled = !fin;
          if (fin) ended();
          return;
        }
        const sec = document.querySelector('section.job[data-job-id="' + ev.job_id + '"]');
        if (!sec) return;
        setState(sec, ev.state);
        const node = document.querySelector('#dag g[data-job-id="' + ev.job_id + '"]');
        if (node) { node.dataset.state = ev.state; node.setAttribute("class", "node state-" + ev.state); }
        const pre = sec.querySelector("pre.log");
        if (pre && (ev.state === "running" || ev.state === "assigned")) follow(pre);
        if (FINAL.includes(ev.state)) steps(sec, ev.job_id);
      }
      document.querySelectorAll("section.job").forEach((sec) => {
        if (["running", "assigned"].includes(sec.dataset.state)) follow(sec.querySelector("pre.log"));
      });
      document.querySelectorAll("pre.log").forEach((pre) => {
        pre.scrollTop = pre.scrollHeight;
        pre.addEventListener("scroll", () => { if (pre.scrollTop === 0) earlier(pre); });
      });
      document.querySelectorAll("a.earlier").forEach((a) => a.addEventListener("click", (e) => {
        e.preventDefault();
        const pre = a.closest("section.job").querySelector("pre.log");
        earlier(pre);
      }));
    }
  });
})();
