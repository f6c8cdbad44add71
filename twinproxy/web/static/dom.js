// twinproxy dashboard: DOM helpers shared by the panels (no framework).
//
// Everything is updated in place: a row is found by its key (data-key) and
// only the text or attributes that changed are written, so an input the
// operator is typing in, a focused button or a text selection survive the
// re-render of every poll.
"use strict";

window.TP = window.TP || {};

(function (TP) {
  const SVG_NS = "http://www.w3.org/2000/svg";

  TP.$ = (selector, root) => (root || document).querySelector(selector);
  TP.$$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));
  TP.byTestId = (id, root) => TP.$('[data-testid="' + id + '"]', root);

  // An element with attributes ({text: ..., class: ..., other: attribute}) and children.
  TP.h = function (tag, attrs, children) {
    const el = document.createElement(tag);
    applyAttrs(el, attrs);
    (children || []).forEach((c) => el.appendChild(typeof c === "string" ? document.createTextNode(c) : c));
    return el;
  };

  TP.svg = function (tag, attrs) {
    const el = document.createElementNS(SVG_NS, tag);
    applyAttrs(el, attrs);
    return el;
  };

  function applyAttrs(el, attrs) {
    Object.keys(attrs || {}).forEach((name) => {
      const value = attrs[name];
      if (name === "text") el.textContent = value;
      else if (value !== null && value !== undefined) el.setAttribute(name, String(value));
    });
  }

  // Write only what changed (a write resets a selection and costs a layout).
  TP.setText = function (el, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (el && el.textContent !== value) el.textContent = value;
  };

  TP.setAttr = function (el, name, value) {
    if (!el) return;
    if (value === null || value === undefined) {
      if (el.hasAttribute(name)) el.removeAttribute(name);
    } else if (el.getAttribute(name) !== String(value)) {
      el.setAttribute(name, String(value));
    }
  };

  TP.show = function (el, shown) {
    if (el && el.hidden === shown) el.hidden = !shown;
  };

  // The rows of `tbody` made to match `items`: rows are keyed by keyOf(item);
  // create(item) builds a new row (cells named by data-col), update(row, item)
  // writes its values.  Rows keep their DOM nodes (and any input in them).
  // Keys should be unique; if two items (or two old rows) share one, each item
  // still takes at most one old row, and every child not reused is removed, so
  // a duplicate never makes the table grow poll after poll.
  TP.syncRows = function (tbody, items, keyOf, create, update) {
    const existing = new Map();   // key -> the old rows with that key, in document order
    Array.from(tbody.children).forEach((row) => {
      const key = row.dataset.key;
      if (!existing.has(key)) existing.set(key, []);
      existing.get(key).push(row);
    });
    const kept = new Set();
    let previous = null;
    items.forEach((item) => {
      const key = String(keyOf(item));
      const spare = existing.get(key);
      let row = spare && spare.length ? spare.shift() : null;
      if (!row) {
        row = create(item);
        row.dataset.key = key;
      }
      kept.add(row);
      update(row, item);
      const wanted = previous ? previous.nextSibling : tbody.firstChild;
      if (wanted !== row) tbody.insertBefore(row, wanted);
      previous = row;
    });
    Array.from(tbody.children).forEach((row) => { if (!kept.has(row)) row.remove(); });
  };

  // A <tr> with one <td data-col=name> per column name.
  TP.row = function (columns, attrs) {
    return TP.h("tr", attrs, columns.map((name) => TP.h("td", { "data-col": name })));
  };

  TP.cell = (row, name) => row.querySelector('[data-col="' + name + '"]');

  TP.setCells = function (row, values) {
    Object.keys(values).forEach((name) => TP.setText(TP.cell(row, name), values[name]));
  };

  // -- formatting ---------------------------------------------------------------

  TP.fmt = {
    num(value, digits) {
      if (value === null || value === undefined || Number.isNaN(value)) return "–";
      if (typeof value !== "number") return String(value);
      return digits === undefined ? value.toLocaleString("en-US") : value.toFixed(digits);
    },
    ms(value) {
      return value === null || value === undefined ? "–" : value.toFixed(value < 10 ? 2 : 1);
    },
    rate(value) {
      return value === null || value === undefined ? "–" : value.toFixed(value < 100 ? 1 : 0);
    },
    percent(value) {
      return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + " %";
    },
    bytes(value) {
      if (value === null || value === undefined) return "–";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let v = value, i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
    },
    duration(seconds) {
      if (seconds === null || seconds === undefined) return "–";
      const s = Math.max(0, Math.round(seconds));
      const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
      const mm = Math.floor((s % 3600) / 60), ss = s % 60;
      if (d) return d + "d " + hh + "h";
      if (hh) return hh + "h " + mm + "m";
      if (mm) return mm + "m " + ss + "s";
      return ss + "s";
    },
    clock(unixSeconds) {
      if (unixSeconds === null || unixSeconds === undefined) return "–";
      return new Date(unixSeconds * 1000).toTimeString().slice(0, 8);
    },
    bool(value) {
      return value === null || value === undefined ? "–" : value ? "yes" : "no";
    },
  };

  // The fill of a group in the slot bar and the balance table (stable per id).
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#e15759", "#9c755f",
    "#ff9da7", "#bab0ac"];
  TP.groupColor = (gid) => (gid === null || gid === undefined ? "#c8c8c8" : PALETTE[Math.abs(gid) % PALETTE.length]);
})(window.TP);
