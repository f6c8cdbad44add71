// twinproxy dashboard: the polling loop, the event stream and which panels are shown.
//
// GET /api/state about every poll_seconds (paused while the tab is hidden),
// GET /api/series for the sparklines, and one EventSource on /api/events
// (polling /api/events?since=N&format=json whenever the stream is not open).
// Every event and JSON answer names its log's "stream": another one (a restarted
// server, whose ids start again at 1) empties the event panel and starts over.
// A failed poll shows the "disconnected" banner; the next good one clears it.
"use strict";

(function (TP) {
  const REQUEST_TIMEOUT_MS = 4000;
  let state = null;
  let timer = null;
  let polling = false;
  let adminReady = false;
  let stream = null;
  let lastEventId = 0;
  let eventStream = null;   // the server's event log (its "stream"): ids count from 1 in each one

  TP.currentState = () => state || {};

  // The panels shown when their section is in the document (a plain proxy has no cluster panels).
  const PANELS = [
    ["overview", "overview", TP.renderOverview],
    ["servers", "servers", TP.renderServers],
    ["proxies", "proxies", TP.renderProxies],
    ["slots", "slots", TP.renderSlots],
    ["migrations", "migrations", TP.renderMigrations],
    ["groups", "groups", TP.renderGroups],
    ["commands", "commands", TP.renderCommands],
  ];

  async function getJSON(path) {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(path, { cache: "no-store", signal: controller.signal });
      if (!response.ok) {
        let message = "HTTP " + response.status;
        try { const body = await response.json(); if (body && body.error) message = body.error; } catch (e) { /* */ }
        throw new Error(message);
      }
      return await response.json();
    } catch (err) {
      throw new Error(err.name === "AbortError" ? "no answer in " + REQUEST_TIMEOUT_MS / 1000 + " s" : err.message);
    } finally {
      clearTimeout(timeout);
    }
  }

  function setConnected(ok, reason) {
    const banner = document.getElementById("disconnected");
    TP.show(banner, !ok);
    TP.setText(TP.byTestId("disconnected-reason"), ok ? "" : reason);
    document.body.dataset.connected = ok ? "true" : "false";
  }

  function render(next) {
    state = next;
    TP.setText(TP.byTestId("kind"), next.kind === "cluster" ? "twinproxy cluster" : "twinproxy proxy");
    TP.setText(TP.byTestId("name"), next.name);
    TP.setText(TP.byTestId("version"), next.version);
    TP.setText(TP.byTestId("uptime"), TP.fmt.duration(next.uptime));
    TP.setText(TP.byTestId("mode"), next.admin ? "admin" : "read-only");
    document.body.dataset.kind = next.kind;
    document.body.dataset.admin = next.admin ? "true" : "false";
    if (next.admin && !adminReady) {
      adminReady = true;
      TP.setupAdmin();
      if (next.migrations !== undefined) TP.setupMigrationForms(TP.currentState);
    }
    PANELS.forEach(([id, section, draw]) => {
      const present = next[section] !== undefined && next[section] !== null;
      TP.show(document.getElementById(id), present);
      if (present) {
        try { draw(next); } catch (err) { reportBug(id, err); }
      }
    });
    TP.show(document.getElementById("events"), true);
    if (TP.syncForceButton) TP.syncForceButton();
    document.body.dataset.loaded = "true";
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  }

  // A drawing bug must not stop the other panels (nor the loop); it is said once, in the page.
  function reportBug(panel, err) {
    const section = document.getElementById(panel);
    section.dataset.renderError = String(err && err.message);
  }

  async function poll() {
    timer = null;
    if (polling) return;
    polling = true;
    try {
      const next = await getJSON("/api/state");
      setConnected(true);
      render(next);
      ensureEvents();
      getJSON("/api/series?seconds=300").then(TP.renderSeries, () => { /* the next poll tries again */ });
    } catch (err) {
      setConnected(false, err.message);
    } finally {
      polling = false;
      schedule();
    }
  }

  function schedule(delayMs) {
    if (timer !== null) clearTimeout(timer);
    if (document.hidden) { timer = null; return; }   // visibilitychange starts it again
    const period = state && state.poll_seconds ? state.poll_seconds * 1000 : 1000;
    timer = setTimeout(poll, delayMs === undefined ? period : delayMs);
  }

  // After an action: refresh at once rather than at the next tick.
  TP.pollSoon = () => schedule(50);

  // -- events: one EventSource per page, JSON polling while it is not open --------------

  function ensureEvents() {
    const transport = TP.byTestId("events-transport");
    if (typeof window.EventSource === "function") {
      if (stream === null || stream.readyState === EventSource.CLOSED) {
        if (stream !== null) stream.close();
        // Last-Event-ID is sent by the browser on its own reconnects; a new stream asks with ?since=.
        stream = new EventSource("/api/events" + (lastEventId ? "?since=" + lastEventId : ""));
        stream.onmessage = (message) => {
          let event;
          try { event = JSON.parse(message.data); } catch (err) { return; }   // a malformed frame: skipped
          if (changedStream(event.stream)) {
            // The browser reconnected to a restarted server with the old Last-Event-ID: ask again from the start.
            stream.close();
            stream = null;
            ensureEvents();
            return;
          }
          receive([event]);
        };
      }
      if (stream.readyState === EventSource.OPEN) { TP.setText(transport, "(live)"); return; }
    }
    TP.setText(transport, "(polling)");
    pollEvents(true);
  }

  function pollEvents(again) {
    getJSON("/api/events?since=" + lastEventId + "&format=json").then((answer) => {
      // Another log: the answer was cut at an id of the old one, so it is asked again from the start.
      if (changedStream(answer.stream)) { if (again) pollEvents(false); return; }
      receive(answer.events || []);
    }, () => { /* next poll */ });
  }

  // True (and the page's log emptied, its last id forgotten) when `stream` is not the event log known so far.
  function changedStream(next) {
    if (!next || next === eventStream) return false;
    const changed = eventStream !== null;
    eventStream = next;
    if (changed) {
      lastEventId = 0;
      TP.clearEvents();
    }
    return changed;
  }

  function receive(events) {
    events.forEach((e) => { if (e.id > lastEventId) lastEventId = e.id; });
    TP.addEvents(events);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && !polling) poll();
  });
  window.addEventListener("beforeunload", () => { if (stream) stream.close(); });

  poll();
})(window.TP);
