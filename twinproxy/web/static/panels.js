// twinproxy dashboard: the panels every page has (overview, servers, commands, events) and the proxies' table.
//
// Each render function takes the whole state document and updates its panel
// in place.  Numbers are shown as the server computed them: rates and
// percentiles are never derived in the browser.
"use strict";

(function (TP) {
  const fmt = TP.fmt;

  function fact(testid, text, raw) {
    const el = TP.byTestId(testid);
    TP.setText(el, text);
    TP.setAttr(el, "data-value", raw === null || raw === undefined ? "" : raw);
  }

  TP.renderOverview = function (state) {
    const o = state.overview || {};
    const c = o.coordinator;
    fact("coordinator", c ? c.kind + " " + c.address : "none", c ? c.address : null);
    fact("session", c ? c.session : "–", c ? c.session : null);
    TP.setAttr(TP.byTestId("session"), "data-state", c ? c.session : null);
    fact("generation", fmt.num(o.generation), o.generation);
    fact("ops", fmt.rate(o.ops_per_second), o.ops_per_second);
    fact("requests", fmt.num(o.requests), o.requests);
    fact("clients", fmt.num(o.clients), o.clients);
    fact("servers-up", fmt.num(o.servers_up) + " / " + fmt.num(o.servers_total), o.servers_up);
    TP.setAttr(TP.byTestId("servers-up"), "data-state",
      o.servers_total && o.servers_up < o.servers_total ? "degraded" : "ok");
    fact("p99", o.p99_ms === null || o.p99_ms === undefined ? "–" : fmt.ms(o.p99_ms) + " ms", o.p99_ms);
    renderAlerts(state.alerts || []);
  };

  function renderAlerts(alerts) {
    const list = TP.byTestId("alerts");
    TP.syncRows(list, alerts, (a) => a.kind + "|" + a.subject + "|" + a.text,
      (a) => TP.h("li", { "data-alert": a.kind, "data-subject": a.subject, class: "alert alert-" + a.kind }),
      (li, a) => TP.setText(li, a.kind + ": " + a.text));
    TP.show(list, alerts.length > 0);
  }

  // -- sparklines (GET /api/series) -------------------------------------------------

  TP.renderSeries = function (series) {
    const points = (series && series.points) || [];
    drawSpark("spark-ops", points.map((p) => p.ops_per_second));
    drawSpark("spark-p99", points.map((p) => p.p99_ms));
  };

  function drawSpark(testid, values) {
    const path = TP.byTestId(testid);
    const known = values.filter((v) => v !== null && v !== undefined);
    const max = known.length ? Math.max.apply(null, known) : 0;
    const width = 300, height = 40, step = values.length > 1 ? width / (values.length - 1) : width;
    let d = "", pen = false;
    values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }   // a gap where there was no request
      const x = (i * step).toFixed(1);
      const y = (height - 2 - (max > 0 ? (v / max) * (height - 4) : 0)).toFixed(1);
      d += (pen ? "L" : "M") + x + " " + y + " ";
      pen = true;
    });
    TP.setAttr(path, "d", d.trim());
    TP.setAttr(path, "data-points", values.length);
    TP.setAttr(path, "data-last", known.length ? values[values.length - 1] : "");
    TP.setText(TP.byTestId(testid + "-max"), known.length ? "(max " + fmt.rate(max) + ")" : "");
  }

  // -- servers (the nutcracker view, with the backend's INFO beside it) --------------

  const SERVER_COLUMNS = ["pool", "server", "state", "weight", "connections", "in_flight", "rps", "errors",
    "timeouts", "p50", "p99", "role", "memory", "keys", "hit_ratio", "evictions", "backend_error"];

  function serverState(s) {
    if (s.state === "ejected" && s.ejected_until) return "ejected until " + fmt.clock(s.ejected_until);
    return s.state;
  }

  TP.renderServers = function (state) {
    TP.syncRows(TP.byTestId("servers-rows"), state.servers, (s) => s.pool + "|" + s.addr,
      (s) => TP.row(SERVER_COLUMNS, { "data-server": s.addr, "data-pool": s.pool }),
      (row, s) => {
        const b = s.backend || {};
        TP.setAttr(row, "data-state", s.state);
        TP.setAttr(row, "class", "state-" + s.state);
        TP.setAttr(row, "data-group", s.group === null || s.group === undefined ? null : s.group);
        TP.setCells(row, {
          pool: s.pool, server: s.name && s.name !== s.addr ? s.name + " (" + s.addr + ")" : s.addr,
          state: serverState(s), weight: s.weight, connections: fmt.num(s.connections),
          in_flight: fmt.num(s.in_flight), rps: fmt.rate(s.requests_per_second), errors: fmt.num(s.errors),
          timeouts: fmt.num(s.timeouts), p50: fmt.ms(s.p50_ms), p99: fmt.ms(s.p99_ms),
          role: b.role || s.role || "–",
          memory: s.backend ? fmt.bytes(b.memory) + (b.maxmemory ? " / " + fmt.bytes(b.maxmemory) : "") : "–",
          keys: fmt.num(b.keys), hit_ratio: fmt.percent(b.hit_ratio), evictions: fmt.num(b.evictions),
          backend_error: b.error || "",
        });
        TP.setAttr(TP.cell(row, "state"), "data-state", s.state);
        TP.setAttr(TP.cell(row, "rps"), "data-value", s.requests_per_second);
      });
  };

  // -- proxies (cluster) -----------------------------------------------------------

  const PROXY_COLUMNS = ["id", "addr", "admin_addr", "generation", "last_seen", "ops", "clients", "error_rate",
    "status", "actions"];

  TP.renderProxies = function (state) {
    TP.syncRows(TP.byTestId("proxies-rows"), state.proxies, (p) => p.id,
      (p) => {
        const row = TP.row(PROXY_COLUMNS, { "data-proxy": p.id });
        if (state.admin) {
          TP.cell(row, "actions").appendChild(TP.actionButton("remove", "proxy-remove", () =>
            TP.post("/api/proxies/" + encodeURIComponent(p.id) + "/remove", {},
              { confirm: "Remove proxy " + p.id + " (" + p.addr + ") from the cluster?" })));
        }
        return row;
      },
      (row, p) => {
        const age = state.now && p.last_seen ? state.now - p.last_seen : null;
        TP.setAttr(row, "data-stale", p.stale ? "true" : "false");
        TP.setAttr(row, "data-generation", p.generation);
        TP.setAttr(row, "class", p.stale ? "stale" : "");
        TP.setCells(row, {
          id: p.id, addr: p.addr, admin_addr: p.admin, generation: fmt.num(p.generation),
          last_seen: age === null ? "–" : fmt.duration(age) + " ago", ops: fmt.rate(p.ops_per_second),
          clients: fmt.num(p.clients), error_rate: fmt.percent(p.error_rate),
          status: p.stale ? "stale (" + p.missed + " missed)" : "ok",
        });
      });
  };

  // -- commands ----------------------------------------------------------------------

  // Keyed by pool and command: a proxy with two pools has a "get" row in each.  The pool column is
  // shown only when the rows name a pool.
  const COMMAND_COLUMNS = ["pool", "command", "calls", "errors", "p50", "p99"];

  TP.renderCommands = function (state) {
    const commands = state.commands || [];
    const pooled = commands.some((c) => c.pool !== null && c.pool !== undefined && c.pool !== "");
    TP.show(TP.byTestId("commands-pool-head"), pooled);
    TP.syncRows(TP.byTestId("commands-rows"), commands, (c) => (c.pool || "") + "|" + c.command,
      (c) => TP.row(COMMAND_COLUMNS, { "data-command": c.command, "data-pool": c.pool }),
      (row, c) => {
        TP.show(TP.cell(row, "pool"), pooled);
        TP.setCells(row, { pool: c.pool, command: c.command, calls: fmt.num(c.calls), errors: fmt.num(c.errors),
          p50: fmt.ms(c.p50_ms), p99: fmt.ms(c.p99_ms) });
      });
  };

  // -- events (newest first, the last MAX_EVENTS) -------------------------------------

  const MAX_EVENTS = 300;

  // The log emptied: the server's event log is another one (its process restarted, ids start again at 1).
  TP.clearEvents = function () {
    TP.byTestId("events-rows").replaceChildren();
  };

  TP.addEvents = function (events) {
    const body = TP.byTestId("events-rows");
    events.forEach((e) => {
      if (body.querySelector('tr[data-event="' + e.id + '"]')) return;   // seen (a reconnect replays)
      const row = TP.row(["time", "kind", "subject", "text"], { "data-event": e.id, "data-kind": e.kind,
        class: "event-" + e.kind });
      TP.setCells(row, { time: fmt.clock(e.time), kind: e.kind, subject: e.subject, text: e.text });
      // Newest first: before the first row with a smaller id.
      const after = Array.from(body.children).find((r) => Number(r.dataset.event) < e.id);
      body.insertBefore(row, after || null);
    });
    while (body.children.length > MAX_EVENTS) body.lastChild.remove();
  };
})(window.TP);
