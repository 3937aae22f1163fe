(function () {
  "use strict";
  // Every id, run id and method name comes from a user's run set: it reaches the page only as
  // text (textContent, attribute values, DOM nodes), never as markup (no innerHTML).
  var DATA = JSON.parse(document.getElementById("simfluence-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var W = 900, H = 400, M = {l: 62, r: 18, t: 14, b: 40};
  var visible = Object.create(null);
  DATA.methods.forEach(function (m) { visible[m] = true; });
  var runSel = document.getElementById("run-select");
  var testSel = document.getElementById("test-select");
  var filter = document.getElementById("test-filter");
  var viewer = document.getElementById("viewer");
  var tooltip = document.getElementById("tooltip");
  var errTable = document.getElementById("trajectory-errors");
  var bandSel = document.getElementById("band-select");
  var current = null;
  var clipMarks = Object.create(null);  // method -> its "clipped" mark in the legend

  // a value of a JSON object by its own key only ("toString" is a method name like any other)
  function own(obj, key) {
    return obj && Object.prototype.hasOwnProperty.call(obj, key) ? obj[key] : undefined;
  }
  function clear(node) {
    while (node.firstChild) { node.removeChild(node.firstChild); }
  }
  // an HTML element with text; `parent` gets it
  function h(tag, text, parent, cls) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function swatch(color, parent) {
    var sw = h("span", null, parent, "swatch");
    if (color) { sw.style.background = color; }  // CSSOM, not a style attribute
    return sw;
  }

  document.querySelectorAll(".swatch[data-method]").forEach(function (el) {
    var c = own(DATA.colors, el.getAttribute("data-method"));
    if (c) { el.style.background = c; }
  });

  function el(tag, attrs, parent) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || isNaN(v)) { return "—"; }
    if (!isFinite(v)) { return v > 0 ? "∞" : "−∞"; }
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) { return v.toExponential(3); }
    return v.toPrecision(4);
  }
  function tick(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) { return v.toExponential(2); }
    return String(Number(v.toPrecision(6)));
  }
  function niceTicks(lo, hi, n) {
    var span = hi - lo || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = span / n / step;
    if (err >= 7.5) { step *= 10; } else if (err >= 3.5) { step *= 5; }
    else if (err >= 1.5) { step *= 2; }
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  DATA.runs.forEach(function (run, i) {
    var o = document.createElement("option");
    o.value = i; o.textContent = run.id + " (" + run.steps + " steps)";
    runSel.appendChild(o);
  });

  // which method's 90% interval to shade: the first that has one by default (several overlap)
  (function fillBands() {
    if (!bandSel) { return; }
    var banded = DATA.methods.filter(function (m) {
      return DATA.runs.length && own(DATA.runs[0].bands, m);
    });
    banded.concat(banded.length > 1 ? ["all"] : []).concat(["none"]).forEach(function (m) {
      var o = document.createElement("option");
      o.value = m; o.textContent = m === "all" ? "all methods" : m;
      bandSel.appendChild(o);
    });
    if (!banded.length) { bandSel.parentNode.style.display = "none"; }
  })();

  function fillTests() {
    var run = DATA.runs[+runSel.value], q = filter.value.trim().toLowerCase();
    var keep = testSel.value;
    clear(testSel);
    run.tests.forEach(function (j, k) {
      var id = DATA.test_ids[j];
      if (q && id.toLowerCase().indexOf(q) < 0) { return; }
      var o = document.createElement("option");
      o.value = k; o.textContent = id + "  (moves " + fmt(run.movement[k]) + ")";
      testSel.appendChild(o);
    });
    for (var i = 0; i < testSel.options.length; i++) {
      if (keep !== "" && testSel.options[i].value === keep) { testSel.value = keep; break; }
    }
  }

  function buildToggles() {
    var box = document.getElementById("method-toggles");
    var rec = h("label", null, box);
    swatch("#111", rec);
    h("b", "recorded", rec);
    DATA.methods.forEach(function (m) {
      var lab = document.createElement("label");
      var cb = document.createElement("input");
      cb.type = "checkbox"; cb.checked = true; cb.setAttribute("data-method", m);
      cb.addEventListener("change", function () { visible[m] = cb.checked; draw(); });
      lab.appendChild(cb);
      swatch(own(DATA.colors, m), lab);
      h("span", m, lab);
      var clip = h("span", null, lab, "clip");
      clip.setAttribute("data-clip", m);
      clip.title = "part of this rollout is outside the plotted range";
      clipMarks[m] = clip;
      box.appendChild(lab);
    });
  }

  function draw() {
    var run = DATA.runs[+runSel.value];
    var k = testSel.value === "" ? null : +testSel.value;
    var old = viewer.querySelector("svg");
    if (old) { viewer.removeChild(old); }
    tooltip.hidden = true;
    if (k === null) { clear(errTable); return; }
    var rec = run.recorded[k], T = rec.length - 1;
    var bands = run.bands || {};
    var lines = [{name: "recorded", color: "#111", width: 2.6, ys: rec}];
    DATA.methods.forEach(function (m) {
      if (visible[m]) {
        lines.push({name: m, color: own(DATA.colors, m), width: 1.6,
          ys: own(run.simulated, m)[k], band: own(bands, m)});
      }
    });
    var lo = Infinity, hi = -Infinity;
    rec.forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    var span = (hi - lo) || Math.abs(hi) || 1;
    // follow the recorded range; let rollouts widen it by at most half of that range
    var ylo = lo - 0.08 * span, yhi = hi + 0.08 * span;
    var capLo = lo - 0.5 * span, capHi = hi + 0.5 * span;
    lines.slice(1).forEach(function (ln) {
      ln.ys.forEach(function (v) {
        if (v === null) { return; }
        if (v < ylo && v >= capLo) { ylo = v; }
        if (v > yhi && v <= capHi) { yhi = v; }
      });
    });
    var pw = W - M.l - M.r, ph = H - M.t - M.b;
    function X(s) { return M.l + pw * s / Math.max(T, 1); }
    function Y(v) { return M.t + ph * (1 - (v - ylo) / (yhi - ylo)); }
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "loss trajectories"});
    var defs = el("defs", {}, svg), cp = el("clipPath", {id: "plot-clip"}, defs);
    el("rect", {x: M.l, y: M.t, width: pw, height: ph}, cp);
    var grid = el("g", {"class": "grid"}, svg), axis = el("g", {"class": "axis"}, svg);
    niceTicks(ylo, yhi, 6).forEach(function (v) {
      el("line", {x1: M.l, x2: M.l + pw, y1: Y(v), y2: Y(v)}, grid);
      var t = el("text", {x: M.l - 6, y: Y(v) + 4, "text-anchor": "end"}, axis);
      t.textContent = tick(v);
    });
    niceTicks(0, T, 10).forEach(function (s) {
      el("line", {x1: X(s), x2: X(s), y1: M.t, y2: M.t + ph}, grid);
      el("line", {x1: X(s), x2: X(s), y1: M.t + ph, y2: M.t + ph + 4}, axis);
      var t = el("text", {x: X(s), y: M.t + ph + 16, "text-anchor": "middle"}, axis);
      t.textContent = String(Math.round(s));
    });
    el("line", {x1: M.l, x2: M.l + pw, y1: M.t + ph, y2: M.t + ph}, axis);
    el("line", {x1: M.l, x2: M.l, y1: M.t, y2: M.t + ph}, axis);
    var xl = el("text", {x: M.l + pw / 2, y: H - 6, "text-anchor": "middle"}, axis);
    xl.textContent = "training step";
    var yl = el("text", {x: 14, y: M.t + ph / 2, "text-anchor": "middle",
      transform: "rotate(-90 14 " + (M.t + ph / 2) + ")"}, axis);
    yl.textContent = "loss";
    var plot = el("g", {"clip-path": "url(#plot-clip)"}, svg);
    document.querySelectorAll("[data-clip]").forEach(function (c) { c.textContent = ""; });
    // 90% predictive intervals first, under every line
    var shown = bandSel ? bandSel.value : "";
    DATA.methods.forEach(function (m) {
      var b = own(bands, m);
      if (!visible[m] || !b || (shown !== "all" && shown !== m)) { return; }
      var lo = b.lower[k], hi = b.upper[k], up = "", down = "";
      for (var s = 0; s <= T; s++) {
        if (lo[s] === null || hi[s] === null) { continue; }
        var yh = Math.max(-1e4, Math.min(1e4, Y(hi[s])));
        up += (up ? "L" : "M") + X(s).toFixed(1) + "," + yh.toFixed(1);
      }
      for (var s2 = T; s2 >= 0; s2--) {
        if (lo[s2] === null || hi[s2] === null) { continue; }
        var yl = Math.max(-1e4, Math.min(1e4, Y(lo[s2])));
        down += "L" + X(s2).toFixed(1) + "," + yl.toFixed(1);
      }
      if (up) {
        el("path", {d: up + down + "Z", "class": "band", fill: own(DATA.colors, m),
          "data-band": m}, plot);
      }
    });
    // rollouts first, recorded on top
    lines.slice(1).concat([lines[0]]).forEach(function (ln) {
      var d = "", pen = "M", clipped = false;
      ln.ys.forEach(function (v, s) {
        if (v === null) { pen = "M"; clipped = true; return; }
        if (v < ylo || v > yhi) { clipped = true; }
        // keep far-off values finite for the path; the clip path hides them
        var y = Math.max(-1e4, Math.min(1e4, Y(v)));
        d += pen + X(s).toFixed(1) + "," + y.toFixed(1);
        pen = "L";
      });
      el("path", {d: d, "class": "series", "data-name": ln.name, stroke: ln.color,
        "stroke-width": ln.width}, plot);
      if (clipped && ln !== lines[0]) {
        var mark = clipMarks[ln.name];
        if (mark) { mark.textContent = "↕"; }
      }
    });
    var cross = el("line", {"class": "crosshair", y1: M.t, y2: M.t + ph, x1: -10, x2: -10,
      visibility: "hidden"}, svg);
    var dots = el("g", {}, svg);
    var overlay = el("rect", {x: M.l, y: M.t, width: pw, height: ph, fill: "transparent",
      "class": "overlay"}, svg);
    function hover(evt) {
      var box = svg.getBoundingClientRect();
      var px = (evt.clientX - box.left) * W / box.width;
      var s = Math.round((px - M.l) / pw * T);
      s = Math.max(0, Math.min(T, s));
      cross.setAttribute("x1", X(s)); cross.setAttribute("x2", X(s));
      cross.setAttribute("visibility", "visible");
      clear(dots);
      clear(tooltip);
      h("b", "step " + s, tooltip);
      var rows = h("table", null, tooltip);
      lines.forEach(function (ln) {
        var v = ln.ys[s];
        if (v !== null && v >= ylo && v <= yhi) {
          el("circle", {cx: X(s), cy: Y(v), r: 3, fill: ln.color}, dots);
        }
        var b = ln.band, band = "";
        if (b && b.lower[k][s] !== null && b.upper[k][s] !== null) {
          band = " [" + fmt(b.lower[k][s]) + ", " + fmt(b.upper[k][s]) + "]";
        }
        var tr = h("tr", null, rows), name = h("td", null, tr);
        swatch(ln.color, name);
        name.appendChild(document.createTextNode(ln.name));
        h("td", fmt(v) + band, tr, "num");
      });
      tooltip.hidden = false;
      var vbox = viewer.getBoundingClientRect();
      var left = evt.clientX - vbox.left + 14;
      if (left + tooltip.offsetWidth > vbox.width) { left -= tooltip.offsetWidth + 28; }
      tooltip.style.left = left + "px";
      tooltip.style.top = Math.max(0, evt.clientY - vbox.top - 20) + "px";
    }
    overlay.addEventListener("mousemove", hover);
    overlay.addEventListener("mouseleave", function () {
      cross.setAttribute("visibility", "hidden"); clear(dots); tooltip.hidden = true;
    });
    viewer.insertBefore(svg, tooltip);
    // this trajectory's errors, per method
    clear(errTable);
    var headRow = h("tr", null, h("thead", null, errTable));
    [DATA.test_ids[run.tests[k]] + " in " + run.id, "MSE over steps 1..T", "final loss",
      "recorded final"].forEach(function (t) { h("th", t, headRow); });
    var body = h("tbody", null, errTable);
    DATA.methods.forEach(function (m) {
      var ys = own(run.simulated, m)[k], sum = 0, n = 0;
      for (var s = 1; s <= T; s++) {
        if (ys[s] === null || rec[s] === null) { sum = Infinity; break; }
        sum += (ys[s] - rec[s]) * (ys[s] - rec[s]); n++;
      }
      var tr = h("tr", null, body), name = h("th", null, tr);
      swatch(own(DATA.colors, m), name);
      name.appendChild(document.createTextNode(m));
      [fmt(n ? sum / n : sum), fmt(ys[T]), fmt(rec[T])].forEach(function (t) {
        h("td", t, tr, "num");
      });
    });
    current = {run: +runSel.value, test: k};
  }

  function step(delta) {
    var i = testSel.selectedIndex + delta;
    if (i >= 0 && i < testSel.options.length) { testSel.selectedIndex = i; draw(); }
  }
  runSel.addEventListener("change", function () { fillTests(); draw(); });
  if (bandSel) { bandSel.addEventListener("change", draw); }
  testSel.addEventListener("change", draw);
  filter.addEventListener("input", function () { fillTests(); draw(); });
  document.getElementById("prev-test").addEventListener("click", function () { step(-1); });
  document.getElementById("next-test").addEventListener("click", function () { step(1); });
  buildToggles();
  fillTests();
  draw();
  window.simfluenceViewer = {data: DATA, draw: draw, current: function () { return current; }};
})();
