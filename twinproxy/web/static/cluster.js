// twinproxy dashboard: the cluster's panels (slots, migrations, groups and HA) and their forms.
"use strict";

(function (TP) {
  const fmt = TP.fmt;
  const SLOT_COUNT = 1024;
  const ENDED = ["finished", "cancelled", "failed"];

  // -- slots: one rect per run, hatched over the migrating ones -------------------

  TP.renderSlots = function (state) {
    const runs = state.slots.runs || [];
    const signature = JSON.stringify(runs);
    const bar = TP.byTestId("slot-bar");
    if (bar.dataset.signature !== signature) {
      bar.dataset.signature = signature;
      const runsLayer = TP.byTestId("slot-runs"), hatches = TP.byTestId("slot-hatches");
      runsLayer.replaceChildren();    // SVG only: no input lives here
      hatches.replaceChildren();
      runs.forEach((run) => {
        const width = run.to - run.from + 1;
        const offline = run.state === "offline" || run.group === null;
        const rect = TP.svg("rect", {
          x: run.from, y: 0, width: width, height: 40, fill: offline ? TP.groupColor(null) : TP.groupColor(run.group),
          "data-range": run.from + "-" + run.to, "data-group": run.group === null ? "none" : run.group,
          "data-state": run.state, "data-target": run.target === null ? null : run.target,
          "data-migration": run.migration === null ? null : run.migration, class: "run run-" + run.state,
        });
        const title = TP.svg("title");
        title.textContent = "slots " + run.from + "-" + run.to + ": " + (offline ? "offline" : "group " + run.group) +
          (run.state === "migrating" ? " → group " + run.target : "");
        rect.appendChild(title);
        runsLayer.appendChild(rect);
        if (run.state === "migrating") {
          hatches.appendChild(TP.svg("rect", { x: run.from, y: 0, width: width, height: 40, fill: "url(#hatch)",
            class: "hatch", "data-hatch": run.from + "-" + run.to, "pointer-events": "none" }));
        }
      });
      const migrating = runs.filter((r) => r.state === "migrating");
      TP.byTestId("slot-migrating").replaceChildren(...migrating.map((r) => TP.h("li", {
        "data-range": r.from + "-" + r.to, "data-target": r.target,
        text: "slots " + r.from + "-" + r.to + " migrating to group " + r.target +
          (r.migration === null ? "" : " (migration " + r.migration + ")"),
      })));
    }
    renderBalance(state.slots.groups || []);
  };

  function renderBalance(groups) {
    TP.syncRows(TP.byTestId("balance-rows"), groups, (g) => g.id,
      (g) => {
        const row = TP.row(["group", "slots", "share", "keys", "memory"], { "data-group": g.id });
        const swatch = TP.h("span", { class: "swatch", style: "background:" + TP.groupColor(g.id) });
        TP.cell(row, "group").before(TP.h("td", {}, [swatch]));
        return row;
      },
      (row, g) => {
        TP.setAttr(row, "data-slots", g.slots);
        TP.setCells(row, { group: g.id, slots: g.slots, share: (100 * g.slots / SLOT_COUNT).toFixed(1) + " %",
          keys: fmt.num(g.keys), memory: fmt.bytes(g.memory) });
      });
  }

  // -- migrations --------------------------------------------------------------------

  function migrationList(state) {
    const m = state.migrations;
    if (Array.isArray(m)) return m;
    return (m && m.migrations) || [];
  }

  const MIGRATION_COLUMNS = ["id", "slots", "groups", "state", "moved", "left", "rate", "eta", "error", "actions"];

  TP.renderMigrations = function (state) {
    const list = migrationList(state).slice().sort((a, b) => b.id - a.id);
    TP.show(TP.byTestId("migrations-empty"), list.length === 0);
    TP.syncRows(TP.byTestId("migrations-rows"), list, (m) => m.id,
      (m) => {
        const row = TP.row(MIGRATION_COLUMNS, { "data-migration": m.id });
        TP.cell(row, "error").appendChild(TP.h("code", { "data-testid": "migration-error" }));
        if (state.admin) TP.cell(row, "actions").appendChild(migrationControls(m.id));
        return row;
      },
      (row, m) => {
        const ended = ENDED.indexOf(m.state) >= 0;
        TP.setAttr(row, "data-state", m.state);
        TP.setAttr(row, "data-paused", m.paused ? "true" : "false");
        TP.setAttr(row, "data-keys-moved", m.keys_moved);
        TP.setAttr(row, "data-keys-left", m.keys_left === null ? "" : m.keys_left);
        TP.setAttr(row, "class", "migration-" + m.state);
        TP.setCells(row, {
          id: m.id, slots: m.first + "-" + m.last, groups: m.from_group + " → " + (m.adopt ? "slots' owners (adoption)" : m.to_group),
          state: m.state + (m.paused && !ended ? " (paused)" : "") + (m.cancelling && !ended ? " (cancelling)" : ""),
          moved: fmt.num(m.keys_moved), left: fmt.num(m.keys_left), rate: fmt.rate(m.rate),
          eta: m.eta === null || m.eta === undefined ? "–" : fmt.duration(m.eta),
        });
        TP.setText(TP.$('[data-testid="migration-error"]', row), m.error || "");
        const controls = TP.$(".controls", row);
        if (controls) {
          TP.show(controls, !ended);
          TP.show(TP.$('[data-testid="migration-pause"]', controls), !m.paused);
          TP.show(TP.$('[data-testid="migration-resume"]', controls), !!m.paused);
          const throttle = TP.$('[data-testid="migration-throttle"]', controls);
          if (document.activeElement !== throttle) throttle.placeholder = m.keys_per_second || "keys/s";
        }
      });
  };

  function migrationControls(mid) {
    const base = "/api/migrations/" + mid;
    const throttle = TP.h("input", { type: "number", min: "1", "data-testid": "migration-throttle",
      placeholder: "keys/s", class: "narrow" });
    return TP.h("span", { class: "controls" }, [
      TP.actionButton("pause", "migration-pause", () => TP.post(base + "/pause", {})),
      TP.actionButton("resume", "migration-resume", () => TP.post(base + "/resume", {})),
      TP.actionButton("cancel", "migration-cancel", () => TP.post(base + "/cancel", {},
        { confirm: "Cancel migration " + mid + "? Its slots go back to their owner." })),
      throttle,
      TP.actionButton("throttle", "migration-throttle-set", () => {
        const text = throttle.value.trim();
        return TP.post(base + "/throttle", { keys_per_second: text === "" ? null : Number(text) });
      }),
    ]);
  }

  // The migrate and force-assign forms: checked here first, so a wrong slot sends nothing.
  function groupIds(state) {
    if (state.groups) return state.groups.map((g) => g.id);
    return ((state.slots && state.slots.groups) || []).map((g) => g.id);
  }

  function integer(text) {
    return /^\s*-?\d+\s*$/.test(text) ? Number(text) : NaN;
  }

  TP.checkRange = function (state, firstText, lastText, groupText) {
    const first = integer(firstText), last = integer(lastText), group = integer(groupText);
    const slot = (v) => Number.isInteger(v) && v >= 0 && v < SLOT_COUNT;
    if (!slot(first)) return { error: "first slot must be an integer from 0 to " + (SLOT_COUNT - 1) };
    if (!slot(last)) return { error: "last slot must be an integer from 0 to " + (SLOT_COUNT - 1) };
    if (first > last) return { error: "first slot must not be after the last (" + first + " > " + last + ")" };
    if (!Number.isInteger(group)) return { error: "group must be a group id" };
    if (groupIds(state).indexOf(group) < 0) return { error: "there is no group " + group };
    return { first: first, last: last, group: group };
  };

  function showError(testid, text) {
    const el = TP.byTestId(testid);
    TP.setText(el, text || "");
    TP.show(el, !!text);
  }

  // A dry run's answer as one list in slot order: its moves (owned slots, one migration each) and its
  // placements (offline slots, assigned without moving keys; a fresh cluster has only these).
  TP.rebalanceSteps = function (answer) {
    const moves = (answer.moves || []).map((m) => Object.assign({ step: "move" }, m));
    const placed = (answer.placements || []).map((p) => Object.assign({ step: "place" }, p));
    return moves.concat(placed).sort((a, b) => a.first - b.first);
  };

  // host:port or [IPv6]:port (what the add-server form sends).
  TP.isServerAddress = function (text) {
    const match = /^(?:[^\s:[\]]+|\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]):(\d{1,5})$/.exec(text);
    return !!match && Number(match[1]) <= 65535;
  };

  TP.setupMigrationForms = function (currentState) {
    const slot = document.getElementById("migration-forms");
    slot.appendChild(document.getElementById("tpl-migration-forms").content.cloneNode(true));
    const value = (id) => TP.byTestId(id).value;

    TP.byTestId("migrate-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const checked = TP.checkRange(currentState(), value("migrate-first"), value("migrate-last"),
        value("migrate-group"));
      showError("migrate-error", checked.error);
      if (checked.error) return;
      TP.post("/api/slots/migrate", { first: checked.first, last: checked.last, group: checked.group });
    });
    TP.byTestId("migrations-pause-all").addEventListener("click", () => TP.post("/api/migrations/pause", {}));
    TP.byTestId("migrations-resume-all").addEventListener("click", () => TP.post("/api/migrations/resume", {}));

    // Rebalance: a dry run shows the plan; only "apply" changes anything.
    const planBox = TP.byTestId("rebalance-plan-box");
    TP.byTestId("rebalance-preview").addEventListener("click", () => {
      TP.post("/api/slots/rebalance", { dry_run: true }, { quiet: true }).then((answer) => {
        if (!answer) return;
        const steps = TP.rebalanceSteps(answer);
        TP.byTestId("rebalance-plan").replaceChildren(...(steps.length ? steps.map((m) => TP.h("li", {
          "data-range": m.first + "-" + m.last, "data-group": m.group, "data-step": m.step,
          text: "slots " + m.first + "-" + m.last + (m.step === "place" ? " (offline): placed on group " + m.group :
            (m.from_group !== undefined ? ": group " + m.from_group : "") + " → group " + m.group),
        })) : [TP.h("li", { text: "already balanced: nothing to move" })]));
        TP.show(TP.byTestId("rebalance-apply"), steps.length > 0);
        TP.show(planBox, true);
      });
    });
    TP.byTestId("rebalance-discard").addEventListener("click", () => TP.show(planBox, false));
    TP.byTestId("rebalance-apply").addEventListener("click", () => {
      TP.post("/api/slots/rebalance", { dry_run: false }, { confirm: "Apply the rebalance plan shown?" })
        .then((answer) => { if (answer) TP.show(planBox, false); });
    });

    // Force-assign: the escape hatch; enabled only once the cluster's name is typed.
    const nameInput = TP.byTestId("force-name"), forceButton = TP.byTestId("force-submit");
    const syncForce = () => { forceButton.disabled = nameInput.value !== currentState().name; };
    nameInput.addEventListener("input", syncForce);
    TP.syncForceButton = syncForce;
    TP.byTestId("force-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (nameInput.value !== currentState().name) return;
      const checked = TP.checkRange(currentState(), value("force-first"), value("force-last"), value("force-group"));
      showError("force-error", checked.error);
      if (checked.error) return;
      const body = { first: checked.first, last: checked.last, group: checked.group, force: true };
      TP.post("/api/slots/assign", body, { confirm: "Force slots " + checked.first + "-" + checked.last +
        " onto group " + checked.group + "? Keys are not moved; a migration in the way is overridden.",
      danger: true }).then((answer) => { if (answer) { nameInput.value = ""; syncForce(); } });
    });
  };

  // -- groups and HA -----------------------------------------------------------------

  const GROUP_SERVER_COLUMNS = ["addr", "expected", "actual", "up", "link", "lag", "error", "actions"];

  TP.renderGroups = function (state) {
    TP.syncRows(TP.byTestId("group-cards"), state.groups, (g) => g.id,
      (g) => groupCard(state, g), (card, g) => updateGroupCard(state, card, g));
    TP.syncRows(TP.byTestId("sentinels-rows"), state.sentinels || [], (s) => s.addr,
      (s) => TP.row(["addr", "up", "error"], { "data-sentinel": s.addr }),
      (row, s) => {
        TP.setAttr(row, "data-up", s.up === null || s.up === undefined ? "unknown" : s.up ? "true" : "false");
        TP.setCells(row, { addr: s.addr, up: fmt.bool(s.up), error: s.error || "" });
      });
  };

  function groupCard(state, g) {
    const card = TP.h("div", { class: "card", "data-group": g.id }, [
      TP.h("h3", {}, [TP.h("span", { class: "swatch", style: "background:" + TP.groupColor(g.id) }),
        TP.h("span", { "data-testid": "group-title" })]),
      TP.h("p", { "data-testid": "group-sentinel", class: "sentinel" }),
      TP.h("table", {}, [
        TP.h("thead", {}, [TP.h("tr", {}, ["server", "expected", "actual", "up", "link", "lag", "error", ""]
          .map((t) => TP.h("th", { text: t })))]),
        TP.h("tbody", { "data-testid": "group-servers" }),
      ]),
    ]);
    if (state.admin) {
      const input = TP.h("input", { type: "text", placeholder: "host:port or [v6]:port", "data-testid": "add-server-addr" });
      const form = TP.h("form", { class: "inline", "data-testid": "add-server-form" }, [
        input, TP.h("button", { type: "submit", "data-testid": "add-server-submit", text: "add server" })]);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const addr = input.value.trim();
        if (!TP.isServerAddress(addr)) {
          TP.report(false, "a server address is host:port or [IPv6]:port, not " + JSON.stringify(addr));
          return;
        }
        TP.post("/api/groups/" + g.id + "/servers", { addr: addr }).then((answer) => { if (answer) input.value = ""; });
      });
      card.appendChild(form);
    }
    return card;
  }

  function updateGroupCard(state, card, g) {
    TP.setText(TP.byTestId("group-title", card), "group " + g.id + " · " + g.slots + " slots");
    const s = g.sentinel;
    const sentinel = TP.byTestId("group-sentinel", card);
    TP.setText(sentinel, s ? "sentinel: master " + (s.master || "unknown") + ", epoch " + fmt.num(s.epoch) +
      (s.agrees ? "" : " — disagrees with the group") : "no sentinel");
    TP.setAttr(sentinel, "data-agrees", s ? String(!!s.agrees) : null);
    TP.setAttr(sentinel, "data-master", s ? s.master : null);
    TP.syncRows(TP.byTestId("group-servers", card), g.servers, (srv) => srv.addr,
      (srv) => {
        const row = TP.row(GROUP_SERVER_COLUMNS, { "data-server": srv.addr });
        if (state.admin) {
          const base = "/api/groups/" + g.id;
          TP.cell(row, "actions").append(
            TP.actionButton("promote", "promote", () => TP.post(base + "/promote", { addr: srv.addr },
              { confirm: "Promote " + srv.addr + " to master of group " + g.id + "?", danger: true })),
            TP.actionButton("remove", "remove-server", () => TP.post(base + "/servers/" +
              encodeURIComponent(srv.addr) + "/remove", {},
            { confirm: "Remove " + srv.addr + " from group " + g.id + "?", danger: true })));
        }
        return row;
      },
      (row, srv) => {
        const mismatch = srv.actual_role !== null && srv.actual_role !== undefined && srv.actual_role !== srv.expected_role;
        TP.setAttr(row, "data-expected-role", srv.expected_role);
        TP.setAttr(row, "data-actual-role", srv.actual_role || "");
        TP.setAttr(row, "data-up", srv.up === null || srv.up === undefined ? "unknown" : srv.up ? "true" : "false");
        TP.setAttr(row, "class", (srv.up === false ? "state-down " : "") + (mismatch ? "mismatch" : ""));
        TP.setCells(row, { addr: srv.addr, expected: srv.expected_role, actual: srv.actual_role || "–",
          up: fmt.bool(srv.up), link: srv.link_up === null || srv.link_up === undefined ? "–" : srv.link_up ? "up" : "down",
          lag: srv.lag_bytes === null || srv.lag_bytes === undefined ? "–" : fmt.bytes(srv.lag_bytes),
          error: srv.error || "" });
        const promote = TP.$('[data-testid="promote"]', row);
        if (promote) TP.show(promote, srv.expected_role !== "master");
      });
  }
})(window.TP);
