// The report page's own script: sortable and filterable tables, the heatmap order toggle, and
// (with #selftest in the address) a self-check that writes its JSON result into <pre id="selftest">.
(function () {
  "use strict";

  function cellKey(td, numeric) {
    var v = td.hasAttribute("data-v") ? td.getAttribute("data-v") : td.textContent.trim();
    if (!numeric) return v.toLowerCase();
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }

  // Sort the body rows of `table` by column `col`; empty numeric cells go last either way.
  function sortTable(table, col, dir) {
    var th = table.tHead.rows[0].cells[col];
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = cellKey(a.cells[col], numeric), y = cellKey(b.cells[col], numeric);
      if (x === null || y === null) return (x === null) - (y === null);
      return x < y ? -sign : x > y ? sign : 0;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
  }

  function setUpSorting(table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column";
      var go = function () {
        var numeric = th.getAttribute("data-type") === "num";
        var now = th.getAttribute("aria-sort");
        var dir = now ? (now === "ascending" ? "descending" : "ascending") : (numeric ? "descending" : "ascending");
        sortTable(table, col, dir);
      };
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    });
  }

  function applyFilter(box, table) {
    var text = box.querySelector("input[type=search]").value.trim().toLowerCase();
    var sq = box.querySelector("select[name=same_question]").value;
    var sa = box.querySelector("select[name=same_answer]").value;
    var rows = table.tBodies[0].rows, shown = 0;
    Array.prototype.forEach.call(rows, function (tr) {
      var ok = (!text || tr.textContent.toLowerCase().indexOf(text) >= 0) &&
               (sq === "any" || tr.getAttribute("data-same-question") === sq) &&
               (sa === "any" || tr.getAttribute("data-same-answer") === sa);
      tr.hidden = !ok;
      shown += ok ? 1 : 0;
    });
    box.querySelector(".count").textContent = shown + " of " + rows.length + " pairs shown";
    return shown;
  }

  function setUpFilter(box) {
    var table = document.getElementById(box.getAttribute("data-filter"));
    if (!table) return;
    var run = function () { applyFilter(box, table); };
    box.querySelector("input[type=search]").addEventListener("input", run);
    Array.prototype.forEach.call(box.querySelectorAll("select"), function (s) { s.addEventListener("change", run); });
  }

  // Reorder the heatmap's rows and columns: `which` is a key of layout.meta.orders.
  function orderHeatmap(which) {
    var gd = document.getElementById("fig-heatmap");
    if (!gd || !gd.data || !window.Plotly) return Promise.resolve(false);
    if (!gd._gcBase) {
      gd._gcBase = {z: gd.data[0].z, labels: gd.data[0].x, ticks: gd.layout.xaxis.ticktext};
    }
    var base = gd._gcBase, meta = gd.layout.meta, perm = meta.orders[which];
    var z = perm.map(function (a) { return perm.map(function (b) { return base.z[a][b]; }); });
    var labels = perm.map(function (a) { return base.labels[a]; });
    var ticks = perm.map(function (a) { return base.ticks[a]; });
    Array.prototype.forEach.call(document.querySelectorAll(".toggle button[data-order]"), function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-order") === which));
    });
    return Plotly.update(gd, {z: [z], x: [labels], y: [labels]}, {
      "xaxis.tickvals": labels, "xaxis.ticktext": ticks, "yaxis.tickvals": labels, "yaxis.ticktext": ticks,
      shapes: which === "question" ? meta.lines : []
    }).then(function () { return true; });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), setUpSorting);
  Array.prototype.forEach.call(document.querySelectorAll("[data-filter]"), setUpFilter);
  Array.prototype.forEach.call(document.querySelectorAll(".toggle button[data-order]"), function (b) {
    b.addEventListener("click", function () { window.__gcPending = orderHeatmap(b.getAttribute("data-order")); });
  });

  // ---------------------------------------------------------------- self-check (#selftest)

  // The finite values of a trace (z of a heatmap, y otherwise).
  function values(trace) {
    var rows = trace.type === "heatmap" ? Array.from(trace.z || []) : [trace.y || []];
    var out = [];
    rows.forEach(function (row) {
      Array.from(row).forEach(function (v) { if (v !== null && v !== undefined && isFinite(v)) out.push(+v); });
    });
    return out;
  }

  function columnValues(table, col) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return cellKey(r.cells[col], true); });
  }

  function sorted(values, dir) {
    for (var k = 1; k < values.length; k++) {
      if (dir === "ascending" ? values[k - 1] > values[k] : values[k - 1] < values[k]) return false;
    }
    return true;
  }

  function waitForPlots(deadline) {
    var divs = document.querySelectorAll(".plotly-graph-div");
    var ready = Array.prototype.every.call(divs, function (gd) { return gd._fullLayout && gd.querySelector(".main-svg"); });
    if (ready || Date.now() > deadline) return Promise.resolve(ready);
    return new Promise(function (res) { setTimeout(res, 50); }).then(function () { return waitForPlots(deadline); });
  }

  // Where the answer and the ripple table sit, and every table that pokes out of the page instead of
  // scrolling inside its box.
  function layout() {
    var bottom = function (id) {
      var el = document.getElementById(id);
      return el ? el.getBoundingClientRect().bottom + window.scrollY : null;
    };
    var right = document.body.getBoundingClientRect().right;
    var cut = Array.prototype.filter.call(document.querySelectorAll("table"), function (t) {
      return !t.closest(".scroll, details:not([open])") && t.getBoundingClientRect().right > right + 1;
    }).map(function (t) { return t.id || t.className || t.tHead && t.tHead.textContent.slice(0, 40) || "table"; });
    return {viewport: [window.innerWidth, window.innerHeight], page_width: document.documentElement.scrollWidth,
            answer_bottom: bottom("answer"), glance_bottom: bottom("ripple-glance"), cut_off: cut};
  }

  function selftest() {
    var out = {errors: window.__gcErrors, figures: {}, heatmap: null, sort: null, filter: null, plotly: !!window.Plotly,
               layout: layout()};
    return waitForPlots(Date.now() + 10000).then(function (ready) {
      out.plots_ready = ready;
      Array.prototype.forEach.call(document.querySelectorAll(".plotly-graph-div"), function (gd) {
        var data = gd._fullData || gd.data || [];  // _fullData: typed-array (bdata) inputs decoded
        var vals = data.reduce(function (acc, t) { return acc.concat(values(t)); }, []);
        out.figures[gd.id] = {traces: data.length, points: vals.length,
                              nonzero: vals.filter(function (v) { return v !== 0; }).length,
                              rendered: !!gd.querySelector(".main-svg")};
      });
      var gd = document.getElementById("fig-heatmap");
      var before = gd.data[0].y.slice();
      var meta = gd.layout.meta;
      var expected = meta.orders.cluster.map(function (a) { return (gd._gcBase || gd.data[0]).x[a]; });
      document.querySelector(".toggle button[data-order=cluster]").click();
      return window.__gcPending.then(function () {
        var after = gd.data[0].y.slice();
        out.heatmap = {n: before.length,
                       orders_differ: JSON.stringify(meta.orders.cluster) !== JSON.stringify(meta.orders.question),
                       changed: JSON.stringify(after) !== JSON.stringify(before),
                       is_cluster_order: JSON.stringify(after) === JSON.stringify(expected),
                       pressed: document.querySelector(".toggle button[data-order=cluster]").getAttribute("aria-pressed")};
        document.querySelector(".toggle button[data-order=question]").click();
        return window.__gcPending;
      }).then(function () {
        out.heatmap.restored = JSON.stringify(gd.data[0].y) === JSON.stringify(before);
      });
    }).then(function () {
      var table = document.getElementById("pairs-table");
      var th = table.tHead.rows[0].cells[1];
      var first = columnValues(table, 1);
      th.click();
      var one = columnValues(table, 1), dirOne = th.getAttribute("aria-sort");
      th.click();
      var two = columnValues(table, 1), dirTwo = th.getAttribute("aria-sort");
      var rankTh = table.tHead.rows[0].cells[0];
      rankTh.click();
      if (rankTh.getAttribute("aria-sort") !== "ascending") rankTh.click();  // back to the page's own order
      var rank = columnValues(table, 0);
      out.sort = {rows: first.length, first: dirOne, first_sorted: sorted(one, dirOne), second: dirTwo,
                  second_sorted: sorted(two, dirTwo), order_changed: JSON.stringify(one) !== JSON.stringify(two),
                  rank_sorted: sorted(rank, table.tHead.rows[0].cells[0].getAttribute("aria-sort"))};
      var box = document.querySelector('[data-filter="pairs-table"]');
      var sel = box.querySelector("select[name=same_question]");
      sel.value = "1";
      sel.dispatchEvent(new Event("change"));
      var visible = Array.prototype.filter.call(table.tBodies[0].rows, function (r) { return !r.hidden; });
      out.filter = {same_question_rows: visible.length,
                    all_same_question: visible.every(function (r) { return r.getAttribute("data-same-question") === "1"; }),
                    count_text: box.querySelector(".count").textContent};
      sel.value = "any";
      sel.dispatchEvent(new Event("change"));
    }).catch(function (e) {
      out.errors.push("selftest: " + (e && e.stack ? e.stack : String(e)));
    }).then(function () {
      var pre = document.getElementById("selftest");
      pre.textContent = JSON.stringify(out);
      pre.hidden = false;
      document.body.setAttribute("data-selftest", "done");
    });
  }

  window.gradcoupleReport = {orderHeatmap: orderHeatmap, sortTable: sortTable, selftest: selftest};
  if (location.hash === "#selftest") {
    if (document.readyState === "complete") selftest();
    else window.addEventListener("load", function () { selftest(); });
  }
})();
