/* specsight run report: draws each metric of the embedded run data as an SVG heatmap (two
   axes), a line plot (one axis) or a number, with a tooltip giving every axis label and the
   exact value of the cell under the pointer. No libraries and no network: everything the page
   needs is inline. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("specsight-data").textContent);
  var tip = document.getElementById("tip");
  var DIVERGING = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];
  var SEQUENTIAL = [[255, 255, 217], [161, 218, 180], [65, 182, 196], [34, 94, 168], [8, 29, 88]];

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(name, text, parent, cls) {
    var node = document.createElement(name);
    if (text !== undefined && text !== null) node.textContent = text;
    if (cls) node.className = cls;
    if (parent) parent.appendChild(node);
    return node;
  }

  function exact(v, f32) {
    // the shortest decimal that reads back as the same float32 (or float64) value
    if (v === null || v === undefined) return "nan";
    if (!f32) return String(v);
    for (var p = 1; p <= 9; p++) {
      var s = v.toPrecision(p);
      if (Math.fround(parseFloat(s)) === Math.fround(v)) return String(parseFloat(s));
    }
    return String(v);
  }

  function short(v) {
    if (v === null || v === undefined) return "nan";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
    return v.toFixed(a < 1 ? 3 : 2);
  }

  function tick(v, step) {
    // a tick label with as many decimals as the tick step needs
    if (Math.abs(v) >= 1e5 || (step < 1e-4 && v !== 0)) return v.toExponential(2);
    return v.toFixed(Math.max(0, Math.min(8, 1 - Math.floor(Math.log10(step)))));
  }

  function mix(stops, t) {
    t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    var i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
    var c = stops[i].map(function (lo, k) { return Math.round(lo + (stops[i + 1][k] - lo) * f); });
    return "rgb(" + c.join(",") + ")";
  }

  function strides(shape) {
    var out = [], s = 1;
    for (var i = shape.length - 1; i >= 0; i--) { out[i] = s; s *= shape[i]; }
    return out;
  }

  function label(m, axis, i) {
    var labels = m.labels[axis];
    return labels && i < labels.length ? labels[i] : String(i);
  }

  function scale(m) {
    // colour of a cell: diverging around the centre (the baseline), else sequential
    var lo = Infinity, hi = -Infinity;
    (m.colour || m.values).forEach(function (v) {
      if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    });
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (m.center !== null) {
      var span = Math.max(Math.abs(hi - m.center), Math.abs(lo - m.center)) || 1;
      return { lo: m.center - span, hi: m.center + span, mid: m.center, colour: function (v) {
        return v === null ? "#bbb" : mix(DIVERGING, 0.5 + (v - m.center) / (2 * span)); }, stops: DIVERGING };
    }
    var width = hi - lo || 1;
    return { lo: lo, hi: hi, mid: null, colour: function (v) {
      return v === null ? "#bbb" : mix(SEQUENTIAL, (v - lo) / width); }, stops: SEQUENTIAL };
  }

  function showTip(m, coords, event) {
    var flat = coords.reduce(function (acc, c, i) { return acc + c * m.strides[i]; }, 0);
    tip.textContent = "";
    html("div", m.name, tip, "tip-name");
    m.axes.forEach(function (axis, i) { html("div", axis + " = " + label(m, axis, coords[i]), tip); });
    html("div", "value = " + exact(m.values[flat], m.f32), tip, "tip-value");
    var extra = m.extra || {};
    if (extra.stderr) html("div", "stderr = " + exact(extra.stderr[flat], m.f32), tip);
    if (extra.ci_low) html("div", "interval = [" + exact(extra.ci_low[flat], m.f32) + ", " +
      exact(extra.ci_high[flat], m.f32) + "]", tip);
    if (extra.effect) html("div", "effect vs " + m.baseline_metric + " = " + exact(extra.effect[flat], m.f32), tip);
    if (m.notes && m.notes[flat]) html("div", m.notes[flat], tip, "tip-note");
    tip.hidden = false;
    var x = event.clientX + 14, y = event.clientY + 14;
    var box = tip.getBoundingClientRect();
    if (x + box.width > window.innerWidth - 8) x = event.clientX - box.width - 14;
    if (y + box.height > window.innerHeight - 8) y = event.clientY - box.height - 14;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }

  function hideTip() { tip.hidden = true; }

  function legend(svg, sc, x, y, width, id, m) {
    var defs = el("defs", {}, svg);
    var grad = el("linearGradient", { id: id }, defs);
    sc.stops.forEach(function (c, i) {
      el("stop", { offset: (100 * i / (sc.stops.length - 1)) + "%", "stop-color": "rgb(" + c.join(",") + ")" }, grad);
    });
    el("rect", { x: x, y: y, width: width, height: 10, fill: "url(#" + id + ")", stroke: "#999" }, svg);
    var ticks = [[0, sc.lo], [1, sc.hi]];
    if (sc.mid !== null) ticks.push([0.5, sc.mid]);
    ticks.forEach(function (t) {
      var text = el("text", { x: x + t[0] * width, y: y + 24, "text-anchor": "middle", class: "tick" }, svg);
      text.textContent = short(t[1]) + (t[0] === 0.5 && m.center_label ? " (" + m.center_label + ")" : "");
    });
  }

  function heatmap(box, m, fixed, index) {
    var rowAxis = m.axes[0], colAxis = m.axes[1];
    var rows = m.shape[0], cols = m.shape[1];
    var rowText = [], colText = [];
    for (var r = 0; r < rows; r++) rowText.push(label(m, rowAxis, r));
    for (var c = 0; c < cols; c++) colText.push(label(m, colAxis, c));
    var longest = function (list) { return list.reduce(function (a, s) { return Math.max(a, s.length); }, 1); };
    var left = Math.min(180, 16 + 7 * longest(rowText)) + 18;
    var bottom = Math.min(130, 12 + 5.2 * longest(colText)) + 24;
    var avail = Math.max(320, (box.clientWidth || 900) - left - 20);
    var cw = Math.max(3, Math.min(56, Math.floor(avail / cols)));
    var ch = Math.max(6, Math.min(26, Math.round(cw * 0.7)));
    var width = left + cw * cols + 20, height = 10 + ch * rows + bottom + 40;
    var svg = el("svg", { class: "heatmap", width: width, height: height, role: "img" }, box);
    var sc = scale(m);
    var colour = m.colour || m.values;
    var g = el("g", { transform: "translate(" + left + ",10)" }, svg);
    for (r = 0; r < rows; r++) {
      for (c = 0; c < cols; c++) {
        var coords = fixed.slice(); coords[0] = r; coords[1] = c;
        var flat = coords.reduce(function (acc, k, i) { return acc + k * m.strides[i]; }, 0);
        el("rect", { class: "cell", x: c * cw, y: r * ch, width: cw, height: ch, fill: sc.colour(colour[flat]),
          "data-r": r, "data-c": c }, g);
      }
    }
    var every = function (size) { return Math.max(1, Math.ceil(11 / size)); };
    for (r = 0; r < rows; r += every(ch)) {
      el("text", { x: -5, y: r * ch + ch / 2 + 4, "text-anchor": "end", class: "tick" }, g).textContent = rowText[r];
    }
    for (c = 0; c < cols; c += every(cw)) {
      var tx = c * cw + cw / 2, ty = rows * ch + 8;
      el("text", { x: tx, y: ty, transform: "rotate(-55 " + tx + " " + ty + ")", "text-anchor": "end",
        class: "tick" }, g).textContent = colText[c];
    }
    el("text", { x: 12, y: 10 + rows * ch / 2, transform: "rotate(-90 12 " + (10 + rows * ch / 2) + ")",
      "text-anchor": "middle", class: "axis-name" }, svg).textContent = rowAxis;
    el("text", { x: left + cw * cols / 2, y: 10 + rows * ch + bottom - 6, "text-anchor": "middle",
      class: "axis-name" }, svg).textContent = colAxis;
    legend(svg, sc, left, height - 34, Math.min(240, Math.max(120, cw * cols)), "legend-" + index, m);
    var outline = el("rect", { class: "outline", width: cw, height: ch, visibility: "hidden" }, g);
    g.addEventListener("mousemove", function (event) {
      var t = event.target;
      if (!t.classList.contains("cell")) return;
      var at = fixed.slice(); at[0] = +t.getAttribute("data-r"); at[1] = +t.getAttribute("data-c");
      outline.setAttribute("x", t.getAttribute("x")); outline.setAttribute("y", t.getAttribute("y"));
      outline.setAttribute("visibility", "visible");
      showTip(m, at, event);
    });
    g.addEventListener("mouseleave", function () { outline.setAttribute("visibility", "hidden"); hideTip(); });
  }

  function lineplot(box, m, fixed) {
    var axis = m.axes[0], n = m.shape[0];
    var at = function (i) { var k = fixed.slice(); k[0] = i; return k.reduce(function (a, x, j) { return a + x * m.strides[j]; }, 0); };
    var ys = [], err = (m.extra || {}).stderr;
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < n; i++) {
      var v = m.values[at(i)], e = err ? err[at(i)] || 0 : 0;
      ys.push(v);
      if (v !== null) { lo = Math.min(lo, v - e); hi = Math.max(hi, v + e); }
    }
    if (m.center !== null) { lo = Math.min(lo, m.center); hi = Math.max(hi, m.center); }
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 1; lo -= 1; }
    var pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
    var texts = []; for (i = 0; i < n; i++) texts.push(label(m, axis, i));
    var longest = texts.reduce(function (a, s) { return Math.max(a, s.length); }, 1);
    var left = 64, bottom = Math.min(120, 14 + 5.2 * longest) + 22, plotH = 220;
    var plotW = Math.max(240, Math.min(900, (box.clientWidth || 900) - left - 20));
    var svg = el("svg", { class: "lineplot", width: left + plotW + 20, height: 12 + plotH + bottom, role: "img" }, box);
    var g = el("g", { transform: "translate(" + left + ",12)" }, svg);
    var xs = function (k) { return n === 1 ? plotW / 2 : (k * plotW) / (n - 1); };
    var y = function (v) { return plotH - ((v - lo) / (hi - lo)) * plotH; };
    el("rect", { x: 0, y: 0, width: plotW, height: plotH, class: "frame" }, g);
    for (var t = 0; t <= 4; t++) {
      var tv = lo + ((hi - lo) * t) / 4;
      el("line", { x1: 0, x2: plotW, y1: y(tv), y2: y(tv), class: "grid" }, g);
      el("text", { x: -6, y: y(tv) + 4, "text-anchor": "end", class: "tick" }, g).textContent = tick(tv, (hi - lo) / 4);
    }
    if (m.center !== null) {
      el("line", { x1: 0, x2: plotW, y1: y(m.center), y2: y(m.center), class: "baseline" }, g);
    }
    if (err) {
      var upper = [], lower = [];
      ys.forEach(function (v, k) {
        if (v === null) return;
        var e = err[at(k)] || 0;
        upper.push(xs(k) + "," + y(v + e)); lower.unshift(xs(k) + "," + y(v - e));
      });
      el("polygon", { points: upper.concat(lower).join(" "), class: "band" }, g);
    }
    var d = "", pen = "M";
    ys.forEach(function (v, k) {
      if (v === null) { pen = "M"; return; }
      d += pen + xs(k) + "," + y(v) + " "; pen = "L";
    });
    el("path", { d: d, class: "line" }, g);
    var every = Math.max(1, Math.ceil((11 * n) / plotW));
    ys.forEach(function (v, k) {
      if (v !== null) el("circle", { cx: xs(k), cy: y(v), r: 3.5, class: "point", "data-i": k }, g);
      if (k % every === 0) {
        var tx = xs(k), ty = plotH + 10;
        el("text", { x: tx, y: ty, transform: "rotate(-55 " + tx + " " + ty + ")", "text-anchor": "end",
          class: "tick" }, g).textContent = texts[k];
      }
    });
    el("text", { x: left + plotW / 2, y: 12 + plotH + bottom - 4, "text-anchor": "middle", class: "axis-name" },
      svg).textContent = axis;
    var hit = el("rect", { x: 0, y: 0, width: plotW, height: plotH, class: "hit" }, g);
    hit.addEventListener("mousemove", function (event) {
      var box2 = hit.getBoundingClientRect();
      var k = n === 1 ? 0 : Math.round(((event.clientX - box2.left) / box2.width) * (n - 1));
      k = Math.max(0, Math.min(n - 1, k));
      var coords = fixed.slice(); coords[0] = k;
      showTip(m, coords, event);
    });
    hit.addEventListener("mouseleave", hideTip);
  }

  function number(box, m) {
    var p = html("p", null, box, "number");
    html("span", exact(m.values[0], m.f32), p, "value");
    var extra = m.extra || {};
    if (extra.stderr) html("span", " \u00b1 " + exact(extra.stderr[0], m.f32), p, "spread");
    if (extra.ci_low) html("span", " [" + exact(extra.ci_low[0], m.f32) + ", " + exact(extra.ci_high[0], m.f32) + "]", p, "spread");
    if (extra.effect) html("span", " (effect vs " + m.baseline_metric + ": " + exact(extra.effect[0], m.f32) + ")", p, "spread");
  }

  function csvField(v) {
    var s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function csvOf(m, fixed) {
    // the cells shown: the first two axes (or one) at the picked values of the others
    var shown = Math.min(2, m.shape.length), extra = m.extra || {};
    var head = [];
    for (var a = 0; a < m.axes.length; a++) head.push(m.axes[a]);
    head.push(m.name);
    ["stderr", "ci_low", "ci_high", "effect"].forEach(function (k) { if (extra[k]) head.push(k); });
    var lines = [head.map(csvField).join(",")];
    var sizes = m.shape.map(function (n, i) { return i < shown ? n : 1; });
    var count = sizes.reduce(function (a, n) { return a * n; }, 1);
    for (var cell = 0; cell < count; cell++) {
      var coords = fixed.slice(), rest = cell;
      for (var i = shown - 1; i >= 0; i--) { coords[i] = rest % sizes[i]; rest = Math.floor(rest / sizes[i]); }
      var flat = coords.reduce(function (acc, c, j) { return acc + c * m.strides[j]; }, 0);
      var row = coords.map(function (c, j) { return label(m, m.axes[j], c); });
      row.push(m.values[flat]);
      ["stderr", "ci_low", "ci_high", "effect"].forEach(function (k) { if (extra[k]) row.push(extra[k][flat]); });
      lines.push(row.map(csvField).join(","));
    }
    return lines.join("\n") + "\n";
  }

  function exportLinks(box, m, fixed) {
    // download the plot as SVG and the cells shown as CSV (made when clicked: nothing is fetched)
    var bar = box.querySelector(".exports") || html("div", null, box, "exports");
    bar.textContent = "";
    var file = m.name.replace(/[^A-Za-z0-9_.-]+/g, "_");
    var svg = box.querySelector(".plot svg");
    if (svg) {
      var a = html("a", "SVG", bar, "export-svg");
      a.setAttribute("download", file + ".svg");
      a.href = "#";
      a.addEventListener("click", function () {
        var text = '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(svg);
        a.href = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
      });
    }
    var b = html("a", "CSV", bar, "export-csv");
    b.setAttribute("download", file + ".csv");
    b.href = "#";
    b.addEventListener("click", function () {
      b.href = "data:text/csv;charset=utf-8," + encodeURIComponent(csvOf(m, fixed));
    });
  }

  function draw(box, m, index) {
    var plot = box.querySelector(".plot");
    plot.textContent = "";
    var fixed = m.shape.map(function (_, i) {
      var pick = box.querySelector("select[data-axis='" + i + "']");
      return pick ? +pick.value : 0;
    });
    if (m.shape.length === 0) number(plot, m);
    else if (m.shape.length === 1) lineplot(plot, m, fixed);
    else heatmap(plot, m, fixed, index);
    exportLinks(box, m, fixed);
  }

  data.metrics.forEach(function (m, index) {
    var box = document.getElementById("metric-" + index);
    if (!box) return;
    m.strides = strides(m.shape);
    var controls = box.querySelector(".slices");
    m.axes.forEach(function (axis, i) {
      if (i < 2 || !controls) return;
      var lab = html("label", axis + " ", controls);
      var pick = html("select", null, lab);
      pick.setAttribute("data-axis", String(i));
      for (var k = 0; k < m.shape[i]; k++) {
        var opt = html("option", label(m, axis, k), pick);
        opt.value = String(k);
      }
      pick.addEventListener("change", function () { draw(box, m, index); });
    });
    draw(box, m, index);
  });
  document.body.setAttribute("data-ready", "1");
})();
