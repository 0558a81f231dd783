/* The StoryMem service page: sign in, the story list, a new-story form, a story live over its
 * event stream, drawn with StoryBoard (board.js). Routes are the URL hash: #/, #/new, #/story/ID.
 *
 * The API token stays in this tab only (sessionStorage). The event stream is read with fetch()
 * so that it carries the Authorization header like every other call (EventSource cannot).
 */
(function () {
  "use strict";

  var el = StoryBoard.el;
  var TOKEN_KEY = "storymem.token";
  var PAGE = 20;
  var app = document.getElementById("app");
  var current = null; // the open view's cleanup (aborts its stream and timers)
  // Paths are taken relative to the page, so the app also works under a route prefix ("/x/").
  var ROOT = location.pathname.replace(/[^/]*$/, "");
  function u(path) { return ROOT + path.replace(/^\//, ""); }

  // ---------------------------------------------------------------------------------------- API

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function ApiError(status, detail) {
    this.status = status;
    this.detail = detail || [];
    this.message = this.detail.map(function (d) { return d.field + ": " + d.problem; }).join("; ") || "HTTP " + status;
  }

  function api(method, path, body) {
    var headers = { Accept: "application/json" };
    var t = token();
    if (t) headers.Authorization = "Bearer " + t;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(u(path), { method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body) })
      .then(function (r) {
        return r.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (!r.ok) {
            var err = new ApiError(r.status, data && data.detail);
            if (r.status === 401 && path.indexOf("/v1/") === 0) signOut("The token was refused: " + err.message);
            throw err;
          }
          return data;
        });
      });
  }

  /* Server-sent events over fetch: calls onEvent(kind, id, data) per event; resolves when the
   * server ends the stream, rejects when the connection fails. */
  function readEvents(path, after, onEvent, signal) {
    var headers = { Accept: "text/event-stream", Authorization: "Bearer " + token() };
    if (after) headers["Last-Event-ID"] = String(after);
    return fetch(u(path), { headers: headers, signal: signal, cache: "no-store" }).then(function (r) {
      if (!r.ok) return r.json().catch(function () { return {}; }).then(function (b) { throw new ApiError(r.status, b.detail); });
      var reader = r.body.getReader();
      var decoder = new TextDecoder();
      var buf = "";
      function block(text) {
        var kind = "message", id = null, data = [];
        text.split("\n").forEach(function (line) {
          if (!line || line[0] === ":") return;
          var i = line.indexOf(":");
          var name = i < 0 ? line : line.slice(0, i);
          var value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (name === "event") kind = value;
          else if (name === "id") id = parseInt(value, 10);
          else if (name === "data") data.push(value);
        });
        if (data.length) onEvent(kind, id, data.join("\n"));
      }
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { if (buf.trim()) block(buf); return; }
          buf += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
          var i;
          while ((i = buf.indexOf("\n\n")) >= 0) { block(buf.slice(0, i)); buf = buf.slice(i + 2); }
          return pump();
        });
      }
      return pump();
    });
  }

  // ---------------------------------------------------------------------------------------- shell

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(message);
  }

  function leave() {
    if (current) current();
    current = null;
    app.innerHTML = "";
  }

  function nav(which) {
    document.querySelectorAll("nav.top [data-nav]").forEach(function (a) { a.classList.toggle("active", a.dataset.nav === which); });
    document.getElementById("signout").hidden = !token();
  }

  function route() {
    leave();
    if (!token()) return showSignIn();
    var hash = location.hash.replace(/^#/, "") || "/";
    var m = hash.match(/^\/story\/([A-Za-z0-9_-]{1,64})$/);
    if (m) return showStory(m[1]);
    if (hash === "/new") return showNew();
    return showList();
  }

  function showSignIn(message) {
    leave();
    nav(null);
    var input = el("input", { type: "password", id: "token", name: "token", autocomplete: "off", size: 40, required: true });
    var errors = el("ul", { class: "field-errors", id: "token-errors", dataset: { for: "token" } });
    if (message) errors.appendChild(el("li", { text: message }));
    var form = el("form", { class: "card signin", id: "signin" }, [
      el("h2", { text: "Sign in" }),
      el("p", { class: "hint", text: "The API token (STORYMEM_API_TOKEN; `make serve` prints where it is). It stays in this tab only." }),
      el("label", { for: "token", text: "API token" }), input, errors,
      el("p", {}, [el("button", { type: "submit", class: "primary", text: "Sign in" })]),
    ]);
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      api("GET", "/v1/stories?limit=1").then(function () { route(); }).catch(function (err) {
        if (err.status !== 401) { errors.replaceChildren(el("li", { text: err.message })); }
      });
    });
    app.appendChild(form);
    input.focus();
  }

  function when(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }
  function stateTag(s) { return el("span", { class: "state state-" + s, text: s }); }

  // ---------------------------------------------------------------------------------------- list

  function showList() {
    nav("list");
    var params = new URLSearchParams((location.hash.split("?")[1]) || "");
    var offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
    var state = params.get("state") || "";
    var text = params.get("q") || "";
    var limit = Math.min(100, Math.max(1, parseInt(params.get("limit") || String(PAGE), 10) || PAGE));
    var stateSel = el("select", { id: "filter-state", name: "state" },
      ["", "queued", "running", "done", "failed", "cancelled"].map(function (s) {
        return el("option", { value: s, text: s || "any state", selected: s === state });
      }));
    var search = el("input", { type: "text", id: "filter-text", placeholder: "filter by name or id", value: text });
    var body = el("tbody");
    var info = el("span", { class: "hint" });
    var prev = el("button", { type: "button", class: "secondary", id: "prev", text: "‹ newer" });
    var next = el("button", { type: "button", class: "secondary", id: "next", text: "older ›" });
    var head = el("tr");
    var table = el("table", { class: "stories", id: "stories" }, [el("thead", {}, [head]), body]);
    var timer = null;
    var alive = true;

    function go(o, s, q) {
      var p = new URLSearchParams();
      if (o) p.set("offset", o);
      if (s) p.set("state", s);
      if (q) p.set("q", q);
      if (limit !== PAGE) p.set("limit", limit);
      location.hash = "#/" + (p.toString() ? "?" + p.toString() : "");
    }
    stateSel.addEventListener("change", function () { go(0, stateSel.value, search.value); });
    search.addEventListener("input", function () { draw(last); });
    search.addEventListener("change", function () { go(offset, state, search.value); });
    prev.addEventListener("click", function () { go(Math.max(0, offset - limit), state, search.value); });
    next.addEventListener("click", function () { go(offset + limit, state, search.value); });

    var last = null;
    function draw(page) {
      if (!page) return;
      last = page;
      var q = search.value.trim().toLowerCase();
      var items = page.items.filter(function (s) {
        return !q || (s.id + " " + (s.story_name || "")).toLowerCase().indexOf(q) >= 0;
      });
      function tenant(s) { return s.tenant || s.owner || ""; }
      var tenants = page.items.some(tenant);
      head.replaceChildren.apply(head, ["story", "state", "shots", "created"].concat(tenants ? ["tenant"] : [])
        .map(function (h) { return el("th", { text: h }); }));
      body.replaceChildren.apply(body, items.map(function (s) {
        return el("tr", { dataset: { id: s.id } }, [
          el("td", {}, [el("a", { href: "#/story/" + s.id, text: s.story_name || s.id }), el("div", { class: "hint", text: s.id })]),
          el("td", {}, [stateTag(s.state)]),
          el("td", { class: "shots", text: s.shots_done + " / " + s.shots_total }),
          el("td", { text: when(s.created) }),
          tenants ? el("td", { class: "tenant", text: tenant(s) }) : null,
        ]);
      }));
      if (!items.length) body.appendChild(el("tr", {}, [el("td", { colspan: 5, class: "hint", text: page.total ? "no story on this page matches" : state ? "no " + state + " stories" : "no stories yet" })]));
      var end = Math.min(page.total, offset + page.items.length);
      info.textContent = page.total ? (offset + 1) + "–" + end + " of " + page.total : "";
      prev.disabled = offset === 0;
      next.disabled = end >= page.total;
    }

    function load() {
      var q = "/v1/stories?offset=" + offset + "&limit=" + limit + (state ? "&state=" + state : "");
      return api("GET", q).then(function (page) {
        if (!alive) return;
        draw(page);
        var busy = page.items.some(function (s) { return s.state === "queued" || s.state === "running"; });
        timer = setTimeout(load, busy ? 2000 : 8000);
      }).catch(function (err) {
        if (alive && err.status !== 401) body.replaceChildren(el("tr", {}, [el("td", { class: "banner-error", text: err.message })]));
      });
    }

    app.appendChild(el("div", {}, [
      el("div", { class: "toolbar" }, [el("h2", { text: "Stories" }), stateSel, search, el("span", { class: "spacer" }), info, prev, next,
        el("a", { href: "#/new" }, [el("button", { type: "button", class: "primary", text: "New story" })])]),
      table,
    ]));
    load();
    current = function () { alive = false; clearTimeout(timer); };
  }

  // ---------------------------------------------------------------------------------------- new story

  var schemaCache = null;
  function settingsSchema() {
    if (!schemaCache) {
      schemaCache = fetch(u("/openapi.json")).then(function (r) { return r.json(); }).then(function (doc) {
        var all = (doc.components || {}).schemas || {};
        return { settings: all.GenerationSettings, all: all };
      });
    }
    return schemaCache;
  }

  function resolve(prop, all) {
    // A property as {type, enum, default, ...}: follows $ref/allOf/anyOf (nullable fields).
    var out = Object.assign({}, prop);
    var variants = prop.anyOf || prop.allOf || (prop.$ref ? [prop] : null);
    if (variants) {
      variants.forEach(function (v) {
        if (v.$ref) Object.assign(out, all[v.$ref.split("/").pop()] || {}, { default: prop.default });
        else if (v.type && v.type !== "null") { out.type = v.type; Object.assign(out, v); }
        else if (v.type === "null") out.nullable = true;
      });
    }
    return out;
  }

  function showNew() {
    nav("new");
    var script = el("textarea", { id: "script", name: "script", rows: 18, spellcheck: "false",
      placeholder: '{"story_name": "...", "shots": [{"prompt": "..."}, {"prompt": "...", "cut": false}]}\n\nor an ST-Bench file: {"story_name", "story_overview", "scenes": [...]}' });
    var upload = el("input", { type: "file", id: "script-file", accept: ".json,application/json" });
    var example = el("select", { id: "example" }, [el("option", { value: "", text: "pick an example…" })]);
    var refs = el("input", { type: "file", id: "refs", accept: "image/png,image/jpeg", multiple: true });
    var refsPreview = el("div", { class: "refs-preview" });
    var settingsBox = el("div", { class: "settings-grid", id: "settings" }, [el("span", { class: "hint", text: "loading the settings schema…" })]);
    var general = el("ul", { class: "field-errors", id: "form-errors" });
    var submit = el("button", { type: "submit", class: "primary", id: "submit", text: "Submit story" });
    var references = [];
    var fields = {};

    function errorList(name) { return el("ul", { class: "field-errors", id: name + "-errors", dataset: { for: name } }); }
    var scriptErrors = errorList("script");
    var refsErrors = errorList("reference_images");

    upload.addEventListener("change", function () {
      var f = upload.files[0];
      if (f) f.text().then(function (t) { script.value = t; });
    });
    fetch(u("/board/examples/index.json")).then(function (r) { return r.json(); }).then(function (list) {
      list.forEach(function (e) { example.appendChild(el("option", { value: e.file, text: e.file + " · " + e.name + " (" + e.shots + " shots)" })); });
    });
    example.addEventListener("change", function () {
      if (!example.value) return;
      fetch(u("/board/examples/" + encodeURIComponent(example.value))).then(function (r) { return r.text(); }).then(function (t) { script.value = t; });
    });
    refs.addEventListener("change", function () {
      references = [];
      refsPreview.innerHTML = "";
      Array.prototype.forEach.call(refs.files, function (f) {
        var reader = new FileReader();
        var slot = references.length;
        references.push(null);
        reader.onload = function () {
          references[slot] = { data: String(reader.result).split(",")[1] };
          refsPreview.appendChild(el("img", { src: reader.result, alt: f.name, title: f.name }));
        };
        reader.readAsDataURL(f);
      });
    });

    settingsSchema().then(function (s) {
      settingsBox.innerHTML = "";
      var props = (s.settings && s.settings.properties) || {};
      Object.keys(props).forEach(function (name) {
        var p = resolve(props[name], s.all);
        var id = "settings-" + name;
        var input;
        if (p.enum) {
          input = el("select", { id: id, name: name }, [el("option", { value: "", text: "default (" + p.default + ")" })]
            .concat(p.enum.map(function (v) { return el("option", { value: v, text: v }); })));
        } else {
          var numeric = p.type === "integer" || p.type === "number";
          input = el("input", {
            id: id, name: name, type: numeric ? "number" : "text",
            step: p.type === "integer" ? (p.multipleOf || 1) : "any",
            min: p.minimum !== undefined ? p.minimum : (p.exclusiveMinimum !== undefined ? p.exclusiveMinimum : null),
            max: p.maximum !== undefined ? p.maximum : null,
            placeholder: p.default === null || p.default === undefined ? "default" : "default " + p.default,
          });
        }
        input.dataset.type = p.type || "string";
        fields["settings." + name] = input;
        settingsBox.appendChild(el("div", { class: "field" }, [
          el("label", { for: id, title: p.description || "", text: name }),
          input,
          el("div", { class: "hint", text: p.description || "" }),
          errorList("settings." + name),
        ]));
      });
    }).catch(function () { settingsBox.replaceChildren(el("span", { class: "banner-error", text: "could not read /openapi.json" })); });

    function clearErrors() {
      app.querySelectorAll(".field-errors").forEach(function (u) { u.innerHTML = ""; });
      app.querySelectorAll(".invalid").forEach(function (n) { n.classList.remove("invalid"); });
    }

    function showErrors(detail) {
      detail.forEach(function (d) {
        var f = d.field || "";
        var target = null, input = null;
        if (fields[f]) { input = fields[f]; target = document.getElementById(f + "-errors"); }
        else if (/^(script\.)?reference_images/.test(f)) { input = refs; target = refsErrors; }
        else if (f === "script" || f.indexOf("script.") === 0 || f === "<json>" || f === "<body>") { input = script; target = scriptErrors; }
        else if (f.indexOf("settings") === 0) { target = general; }
        else target = general;
        if (input) input.classList.add("invalid");
        target.appendChild(el("li", { dataset: { field: f } }, [el("code", { text: f }), " " + d.problem]));
      });
    }

    var form = el("form", { id: "new-story", novalidate: true }, [
      el("div", { class: "form-grid" }, [
        el("div", { class: "card" }, [
          el("h2", { text: "New story" }),
          el("div", { class: "toolbar" }, [example, el("label", { for: "script-file", class: "hint", text: "or upload a script file:" }), upload]),
          el("label", { for: "script", text: "Script (JSON: flat or ST-Bench form)" }), script, scriptErrors,
          el("label", { for: "refs", text: "Reference images" }),
          el("span", { class: "hint", text: "PNG or JPEG: they seed the memory before the first shot (a customised story)." }),
          refs, refsPreview, refsErrors,
          general,
          el("p", {}, [submit]),
        ]),
        el("div", { class: "card" }, [
          el("h3", { text: "Settings" }),
          el("p", { class: "hint", text: "Empty fields are not sent: the server's model profile fills them (the embedded model uses a smaller size, fewer frames and steps than the defaults shown)." }),
          settingsBox,
        ]),
      ]),
    ]);

    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      clearErrors();
      var parsed;
      try {
        parsed = JSON.parse(script.value);
      } catch (e) {
        showErrors([{ field: "script", problem: "not valid JSON (" + e.message + ")" }]);
        return;
      }
      var body = parsed && typeof parsed === "object" && !Array.isArray(parsed) && parsed.script ? parsed : { script: parsed };
      var settings = Object.assign({}, body.settings || {});
      var bad = [];
      Object.keys(fields).forEach(function (key) {
        var input = fields[key];
        var name = key.slice("settings.".length);
        if (input.value === "") return;
        var t = input.dataset.type;
        var v = input.value;
        if (t === "integer" || t === "number") {
          v = Number(v);
          if (!isFinite(v)) { bad.push({ field: key, problem: "must be a number" }); return; }
        }
        settings[name] = v;
      });
      if (bad.length) { showErrors(bad); return; }
      if (Object.keys(settings).length) body.settings = settings; else delete body.settings;
      if (references.length && body.script && typeof body.script === "object") {
        body.script = Object.assign({}, body.script, { reference_images: (body.script.reference_images || []).concat(references.filter(Boolean)) });
      }
      submit.disabled = true;
      api("POST", "/v1/stories", body).then(function (status) {
        location.hash = "#/story/" + status.id;
      }).catch(function (err) {
        submit.disabled = false;
        if (err.status === 401) return;
        showErrors(err.detail.length ? err.detail : [{ field: "<request>", problem: err.message }]);
      });
    });
    app.appendChild(form);
  }

  // ---------------------------------------------------------------------------------------- story

  function viewFromApi(status, memory, shotLinks, finalLink) {
    var settings = (memory && memory.settings) || {};
    var shots = ((memory && memory.shots) || []).map(function (m) {
      return {
        index: m.index, prompt: m.prompt, cut: m.cut, mode: m.mode, frames: m.frames,
        video: shotLinks[m.index] || null,
        keyframes: m.keyframes || [],
        memory_used: m.memory_used || [],
        wall_s: (status.seconds_per_shot || [])[m.index],
      };
    });
    return {
      id: status.id,
      title: status.story_name || status.id,
      state: status.state,
      error: status.error,
      shots_total: status.shots_total,
      fps: settings.fps || 16,
      settings: settings,
      script: (memory && memory.script) || null,
      shots: shots,
      final: finalLink || null,
    };
  }

  function showStory(id) {
    nav(null);
    var alive = true;
    var abort = new AbortController();
    var lastSeq = 0;
    var status = null, memory = null, finalLink = null;
    var shotLinks = {};
    var busy = false, again = false, timer = null, streaming = false;

    var what = el("div", { class: "what", id: "progress-text", text: "loading…" });
    var shotBar = el("div"), stepBar = el("div");
    var cancel = el("button", { type: "button", class: "secondary", id: "cancel", text: "Cancel", disabled: true });
    var resume = el("button", { type: "button", class: "secondary", id: "resume", text: "Resume", disabled: true });
    var message = el("div", { class: "banner-error", id: "story-error" });
    var boardRoot = el("div", { id: "board" });
    app.appendChild(el("div", { class: "card live", id: "live" }, [
      el("div", { class: "bars" }, [what, el("div", { class: "bar", title: "shots" }, [shotBar]), el("div", { class: "bar", title: "denoising steps" }, [stepBar])]),
      cancel, resume, message,
    ]));
    app.appendChild(boardRoot);

    function buttons() {
      var s = status && status.state;
      cancel.disabled = !(s === "queued" || s === "running");
      resume.disabled = !(s === "failed" || s === "cancelled");
    }

    function showProgress(p) {
      var total = p.shots_total || (status && status.shots_total) || 0;
      var done = status ? status.shots_done : 0;
      var text;
      if (p.phase === "done") text = "done: " + total + " of " + total + " shots";
      else if (p.phase === "failed" || p.phase === "cancelled") text = p.phase + (p.message ? ": " + p.message : "") + " (" + done + " of " + total + " shots committed)";
      else if (p.phase === "queued") text = "queued";
      else if (p.phase === "stitch") text = "stitching the final video";
      else if (p.shot !== null && p.shot !== undefined) text = "shot " + (p.shot + 1) + " of " + total + " · " + p.phase + (p.step !== null && p.step !== undefined && p.steps_total ? " · step " + p.step + " of " + p.steps_total : "");
      else text = p.phase || "";
      what.textContent = text;
      what.dataset.phase = p.phase || "";
      shotBar.style.width = (total ? 100 * done / total : 0) + "%";
      stepBar.style.width = (p.steps_total && p.step ? 100 * p.step / p.steps_total : 0) + "%";
      StoryBoard.progress(boardRoot, p);
    }

    function draw() {
      StoryBoard.render(boardRoot, viewFromApi(status, memory, shotLinks, finalLink));
      boardRoot.dataset.shotsDone = String(status.shots_done);
      buttons();
    }

    function refresh() {
      if (!alive) return Promise.resolve();
      if (busy) { again = true; return Promise.resolve(); }
      busy = true;
      return api("GET", "/v1/stories/" + id).then(function (s) {
        status = s;
        var needMemory = !memory || !memory.script || (memory.shots || []).length < s.shots_done;
        return (needMemory ? api("GET", "/v1/stories/" + id + "/memory").then(function (m) { memory = m; }) : Promise.resolve())
          .then(function () {
            var want = [];
            var done = Math.max(s.shots_done, ((memory && memory.shots) || []).length);
            for (var k = 0; k < done; k++) if (!shotLinks[k]) want.push(k);
            return Promise.all(want.map(function (k) {
              return api("GET", "/v1/stories/" + id + "/shots/" + k).then(function (l) { shotLinks[k] = l.url; });
            }));
          })
          .then(function () {
            if (s.state === "done" && !finalLink) return api("GET", "/v1/stories/" + id + "/video").then(function (l) { finalLink = l.url; });
          });
      }).then(function () {
        if (!alive) return;
        draw();
        // A finished story's state wins over its last progress phase (the status keeps the phase of the
        // last event before the end, e.g. commit).
        var ended = status.state === "done" || status.state === "failed" || status.state === "cancelled";
        if (!streaming && !(finalEvent && !ended)) showProgress({ phase: ended ? status.state : (status.phase || status.state), message: status.error, shot: status.current_shot, step: status.step, steps_total: status.steps_total, shots_total: status.shots_total });
        // The stream ended the story but the (briefly cached) status does not say so yet: ask again.
        if (!ended && finalEvent) timer = setTimeout(refresh, 300);
        else if (!ended) follow();
      }).catch(function (err) {
        if (alive && err.status !== 401) message.textContent = err.message;
      }).then(function () {
        busy = false;
        if (again && alive) { again = false; refresh(); }
      });
    }

    var finalEvent = null; // the stream's terminal event, until the status agrees

    function follow() {
      if (streaming || !alive) return;
      streaming = true;
      readEvents("/v1/stories/" + id + "/events", lastSeq, function (kind, seq, data) {
        if (kind !== "progress") { if (kind === "status") refresh(); return; }
        var e = JSON.parse(data);
        if (seq) lastSeq = Math.max(lastSeq, seq);
        if (e.phase === "commit" || e.phase === "start" || e.phase === "stitch") refresh();
        finalEvent = ["done", "failed", "cancelled"].indexOf(e.phase) >= 0 ? e : null;
        if (finalEvent) refresh();
        showProgress(e);
      }, abort.signal).then(function () {
        streaming = false;
        if (alive && status && ["done", "failed", "cancelled"].indexOf(status.state) < 0) timer = setTimeout(refresh, 500);
      }).catch(function (err) {
        streaming = false;
        if (!alive || err.name === "AbortError") return;
        if (err.status && err.status !== 503) { message.textContent = err.message; return; }
        timer = setTimeout(function () { follow(); }, 2000); // a dropped connection: continue after lastSeq
      });
    }

    cancel.addEventListener("click", function () {
      cancel.disabled = true;
      api("DELETE", "/v1/stories/" + id).then(refresh).catch(function (err) { message.textContent = err.message; buttons(); });
    });
    resume.addEventListener("click", function () {
      resume.disabled = true;
      message.textContent = "";
      api("POST", "/v1/stories/" + id + "/resume").then(function (s) { status = s; finalLink = null; finalEvent = null; buttons(); follow(); refresh(); })
        .catch(function (err) { message.textContent = err.message; buttons(); });
    });

    refresh();
    current = function () { alive = false; abort.abort(); clearTimeout(timer); };
  }

  document.getElementById("signout").addEventListener("click", function () { signOut(); });
  window.addEventListener("hashchange", route);
  route();
})();
