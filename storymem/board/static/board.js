/* StoryMem storyboard: renders one story's view object (see storymem/board/__init__.py).
 *
 * StoryBoard.render(root, view) builds the page; calling it again with a newer view of the same
 * story updates only what changed (a committed shot's card is built once, so a playing video is
 * never reset). StoryBoard.progress(root, {shot, step, steps_total, phase}) marks the shot in work.
 * A classic script (no modules): module scripts do not load from file:// pages.
 */
(function () {
  "use strict";

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else if (k === "dataset") Object.keys(v).forEach(function (d) { node.dataset[d] = v[d]; });
        else node.setAttribute(k, v === true ? "" : v);
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  // One hue per origin shot, so a frame can be followed along the timeline by its colour.
  function hue(shot) { return shot < 0 ? 0 : (shot * 67 + 200) % 360; }
  function origin(shot, frame) { return shot + ":" + frame; }
  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function shotLabel(s) { return s < 0 ? "reference" : "shot " + s; }

  function video(src, label) {
    if (!src) return el("div", { class: "sb-video sb-missing", text: label ? label + ": not made yet" : "not made yet" });
    return el("figure", { class: "sb-video" }, [
      el("video", { src: src, controls: true, preload: "auto", muted: true, loop: true, playsinline: true }),
      label ? el("figcaption", { text: label }) : null,
    ]);
  }

  function thumb(state, item, kind) {
    // item: a memory entry {shot, frame, source, slot, url} or a keyframe {frame, url, ...} (+ shot).
    var src = item.url || (item.source === "reference" && state.view.script &&
      (state.view.script.reference_images || [])[item.frame]) || null;
    var badge = kind === "memory" ? (item.slot === "sink" ? "S" : "W") : kind === "reference" ? "R" : "+";
    var caption = item.source === "reference" ? "ref " + item.frame
      : kind === "memory" ? "s" + (item.shot + 1) + " f" + item.frame
      : "f" + item.frame + (item.aesthetic !== undefined && item.aesthetic !== null ? " · " + fmt(item.aesthetic, 2) : "");
    var title = (item.source === "reference" ? "reference image " + item.frame : "shot " + (item.shot + 1) + ", frame " + item.frame) +
      (kind === "memory" ? " (" + item.slot + ")" : "") +
      (item.aesthetic !== undefined ? ", aesthetic " + fmt(item.aesthetic, 3) : "") +
      (item.similarity_prev !== undefined && item.similarity_prev !== null ? ", similarity to previous keyframe " + fmt(item.similarity_prev, 3) : "");
    var node = el("button", {
      type: "button",
      class: "sb-thumb sb-" + kind + (item.slot ? " sb-slot-" + item.slot : "") + (item.source === "reference" ? " sb-ref" : ""),
      title: title,
      style: "--h:" + hue(item.shot),
      dataset: { origin: origin(item.shot, item.frame), shot: String(item.shot), frame: String(item.frame) },
      onclick: function () { inspect(state, item); },
    }, [
      src ? el("img", { src: src, alt: title, loading: "eager" }) : el("span", { class: "sb-noimg", text: "?" }),
      el("span", { class: "sb-badge", text: badge }),
      el("span", { class: "sb-cap", text: caption }),
    ]);
    return node;
  }

  function strip(state, items, kind, empty) {
    if (!items.length) return el("div", { class: "sb-strip sb-empty", text: empty });
    var parts = [];
    items.forEach(function (it, i) {
      if (kind === "memory" && i > 0 && items[i - 1].slot === "sink" && it.slot !== "sink") {
        parts.push(el("span", { class: "sb-divider", title: "sink | window" }));
      }
      parts.push(thumb(state, it, kind));
    });
    return el("div", { class: "sb-strip" }, parts);
  }

  function keyframesOf(shot) {
    return (shot.keyframes || []).map(function (k) { return Object.assign({ shot: shot.index, source: "keyframe" }, k); });
  }

  // ------------------------------------------------------------------------------------------ cards

  function shotCard(state, k) {
    var view = state.view;
    var shot = view.shots[k];
    var planned = (view.script && view.script.shots && view.script.shots[k]) || {};
    var prompt = shot ? shot.prompt : planned.prompt;
    var cut = shot ? shot.cut : planned.cut;
    var compare = view.compare && view.compare.shots ? view.compare.shots[k] : null;
    var videos = [video(shot && shot.video, view.compare ? "with memory" : null)];
    if (view.compare) videos.push(video(compare && compare.video, view.compare.label || "without memory"));
    var head = el("header", {}, [
      el("span", { class: "sb-num", text: "Shot " + (k + 1) }),
      shot ? el("span", { class: "sb-tag", text: shot.mode }) : null,
      el("span", { class: "sb-tag sb-" + (cut === false ? "cont" : "cut"), text: cut === false ? "continues" : "cut" }),
      shot && shot.wall_s ? el("span", { class: "sb-time", text: fmt(shot.wall_s, 1) + " s" }) : null,
      el("span", { class: "sb-work" }),
    ]);
    var body = [head, el("div", { class: "sb-videos" }, videos), el("p", { class: "sb-prompt", text: prompt || "" })];
    if (shot) {
      body.push(el("div", { class: "sb-mem" }, [
        el("h4", { text: "Conditioned on (" + shot.memory_used.length + ")" }),
        strip(state, shot.memory_used, "memory", k === 0 ? "nothing: the first shot is text only" : "empty memory"),
        el("h4", { text: "Added to memory (" + (shot.keyframes || []).length + ")" }),
        strip(state, keyframesOf(shot), "keyframe", "no keyframe passed selection"),
      ]));
    }
    return el("article", { class: "sb-shot" + (shot ? " sb-done" : " sb-pending"), id: "sb-shot-" + k,
      dataset: { index: String(k), committed: shot ? (shot.video ? "2" : "1") : "0" } }, body);
  }

  function timelineRow(state, shot) {
    var added = keyframesOf(shot);
    return el("tr", { dataset: { index: String(shot.index) } }, [
      el("th", { scope: "row" }, [el("a", { href: "#sb-shot-" + shot.index, text: "Shot " + (shot.index + 1) }),
        el("div", { class: "sb-tag", text: shot.mode })]),
      el("td", {}, [strip(state, shot.memory_used, "memory", shot.index === 0 ? "–" : "empty")]),
      el("td", {}, [strip(state, added, "keyframe", "none")]),
    ]);
  }

  function scriptPanel(state) {
    var view = state.view;
    var s = view.script;
    var shots = (s && s.shots) || view.shots;
    var items = [];
    var total = Math.max(view.shots_total || 0, shots.length);
    for (var k = 0; k < total; k++) {
      var shot = shots[k] || view.shots[k] || {};
      var scene = shot.scene !== undefined && shot.scene !== null ? "scene " + shot.scene + " · " : "";
      items.push(el("li", { dataset: { index: String(k) }, class: view.shots[k] ? "sb-made" : "" }, [
        el("a", { href: "#sb-shot-" + k }, [
          el("span", { class: "sb-meta", text: scene + (shot.cut === false ? "continues" : "cut") }),
          el("span", { text: shot.prompt || "(prompt not known yet)" }),
        ]),
      ]));
    }
    var refs = ((s && s.reference_images) || []).map(function (src, j) {
      return thumb(state, { shot: -1, frame: j, source: "reference", slot: null, url: src }, "reference");
    });
    return el("aside", { class: "sb-script" }, [
      el("h3", { text: "Script" }),
      s && s.story_overview ? el("p", { class: "sb-overview", text: s.story_overview }) : null,
      refs.length ? el("div", { class: "sb-refs" }, [el("h4", { text: "Reference images" }), el("div", { class: "sb-strip" }, refs)]) : null,
      el("ol", {}, items),
    ]);
  }

  function finals(view) {
    var parts = [video(view.final, view.compare ? "with memory" : "final video")];
    if (view.compare) parts.push(video(view.compare.final, (view.compare.label || "without memory")));
    return el("section", { class: "sb-final" }, [el("h3", { text: "Final video" }), el("div", { class: "sb-videos" }, parts)]);
  }

  function header(view) {
    var s = view.settings || {};
    var bits = [view.state, (view.shots.length) + " of " + view.shots_total + " shots"];
    if (s.width) bits.push(s.width + "×" + s.height + ", " + s.num_frames + " frames @ " + s.fps + " fps");
    if (s.num_inference_steps) bits.push(s.num_inference_steps + " steps");
    if (s.max_memory_size) bits.push("memory " + s.max_memory_size + " (sink " + s.fix + ")");
    if (view.model) bits.push(view.model);
    return el("header", { class: "sb-head" }, [
      el("h2", { text: view.title || view.id }),
      el("div", { class: "sb-sub", text: bits.join(" · ") }),
      view.error ? el("div", { class: "sb-error", text: view.error }) : null,
    ]);
  }

  // ------------------------------------------------------------------------------------------ inspector

  function inspect(state, item) {
    var view = state.view;
    var box = state.inspector;
    box.innerHTML = "";
    var key = origin(item.shot, item.frame);
    state.root.querySelectorAll(".sb-thumb.sb-picked").forEach(function (n) { n.classList.remove("sb-picked"); });
    state.root.querySelectorAll('.sb-thumb[data-origin="' + key + '"]').forEach(function (n) { n.classList.add("sb-picked"); });
    var src = item.url || (item.source === "reference" && view.script && (view.script.reference_images || [])[item.frame]);
    var from = item.source === "reference" ? null : view.shots[item.shot];
    var kf = from ? (from.keyframes || []).filter(function (k) { return k.frame === item.frame; })[0] : null;
    var lines = [];
    if (item.source === "reference") {
      lines.push("Reference image " + item.frame + " of the script: it seeds the memory before shot 1 (MR2V).");
    } else {
      lines.push("From shot " + (item.shot + 1) + " (index " + item.shot + "), frame " + item.frame +
        (from ? " of " + from.frames : "") + (from ? ", " + from.mode : "") + ".");
      if (kf) lines.push("Aesthetic " + fmt(kf.aesthetic, 3) + "; similarity to the previous keyframe of its shot " + fmt(kf.similarity_prev, 3) + ".");
    }
    var users = view.shots.filter(function (s) {
      return s.memory_used.some(function (m) { return m.shot === item.shot && m.frame === item.frame; });
    }).map(function (s) {
      var m = s.memory_used.filter(function (m) { return m.shot === item.shot && m.frame === item.frame; })[0];
      return "shot " + (s.index + 1) + " (" + m.slot + ")";
    });
    lines.push(users.length ? "Conditioned " + users.join(", ") + "." : "No later shot was conditioned on it yet.");
    var vid = null;
    if (from && from.video) {
      vid = el("video", { src: from.video, controls: true, muted: true, preload: "auto", class: "sb-origin-video" });
      var fps = view.fps || 16;
      vid.addEventListener("loadedmetadata", function () { vid.currentTime = Math.min(vid.duration, (item.frame + 0.5) / fps); });
    }
    box.appendChild(el("div", { class: "sb-insp-body" }, [
      el("button", { type: "button", class: "sb-close", text: "×", title: "close", onclick: function () { box.hidden = true; } }),
      el("h3", { text: item.source === "reference" ? "Reference image " + item.frame : "Shot " + (item.shot + 1) + ", frame " + item.frame }),
      src ? el("img", { src: src, class: "sb-big", alt: "keyframe" }) : null,
      vid,
      el("div", {}, lines.map(function (t) { return el("p", { text: t }); })),
      from ? el("p", { class: "sb-prompt", text: from.prompt }) : null,
      from ? el("a", { href: "#sb-shot-" + from.index, text: "go to shot " + (from.index + 1), onclick: function () { box.hidden = true; } }) : null,
    ]));
    box.hidden = false;
    box.dataset.origin = key;
  }

  // ------------------------------------------------------------------------------------------ render

  function render(root, view) {
    var state = root.__storyboard;
    if (!state || state.id !== view.id) {
      root.innerHTML = "";
      state = { id: view.id, root: root, view: view, cards: [], rows: {}, finalKey: null };
      root.__storyboard = state;
      root.classList.add("storyboard");
      state.head = el("div");
      state.final = el("div");
      state.script = el("div", { class: "sb-script-wrap" });
      state.shots = el("section", { class: "sb-shots" });
      state.timelineBody = el("tbody");
      state.timeline = el("section", { class: "sb-timeline" }, [
        el("h3", { text: "Memory timeline" }),
        el("p", { class: "sb-help", text: "Each row: the memory a shot was conditioned on (S: sink, kept for good; W: sliding window) and the keyframes it added. A frame keeps its colour across rows; click one to see where it came from." }),
        el("table", {}, [el("thead", {}, [el("tr", {}, [el("th", { text: "shot" }), el("th", { text: "memory before the shot" }), el("th", { text: "added keyframes" })])]), state.timelineBody]),
      ]);
      state.inspector = el("div", { class: "sb-inspector", hidden: true });
      root.appendChild(state.head);
      root.appendChild(el("div", { class: "sb-layout" }, [state.script, el("main", {}, [state.final, state.timeline, state.shots])]));
      root.appendChild(state.inspector);
    }
    state.view = view;
    root.classList.toggle("sb-compare", !!view.compare);
    state.head.replaceChildren(header(view));
    state.script.replaceChildren(scriptPanel(state));
    var finalKey = String(!!view.final) + (view.compare ? String(!!view.compare.final) : "");
    if (finalKey !== state.finalKey) {
      state.final.replaceChildren(finals(view));
      state.finalKey = finalKey;
    }
    var total = Math.max(view.shots_total || 0, view.shots.length);
    for (var k = 0; k < total; k++) {
      // A committed shot's card is rebuilt once more when its video link arrives.
      var committed = view.shots[k] ? (view.shots[k].video ? "2" : "1") : "0";
      var card = state.cards[k];
      if (!card || card.dataset.committed !== committed) {
        var fresh = shotCard(state, k);
        if (card) state.shots.replaceChild(fresh, card); else state.shots.appendChild(fresh);
        state.cards[k] = fresh;
      }
      if (view.shots[k] && !state.rows[k]) {
        state.rows[k] = timelineRow(state, view.shots[k]);
        state.timelineBody.appendChild(state.rows[k]);
      }
    }
    return state;
  }

  function progress(root, p) {
    var state = root.__storyboard;
    if (!state) return;
    state.cards.forEach(function (card, k) {
      var work = card.querySelector(".sb-work");
      var active = p && p.shot === k && !card.classList.contains("sb-done") && p.phase && ["done", "failed", "cancelled", "queued"].indexOf(p.phase) < 0;
      card.classList.toggle("sb-active", !!active);
      if (work) work.textContent = active ? p.phase + (p.step !== null && p.step !== undefined ? " " + p.step + "/" + p.steps_total : "") : "";
    });
  }

  window.StoryBoard = { render: render, progress: progress, el: el };
})();
