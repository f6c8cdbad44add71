// twinproxy dashboard: administrative actions (admin pages only).
//
// Every action is one POST with a JSON body and `Authorization: Bearer
// <token>`; the token is asked for once and kept in this tab's session
// storage.  Dangerous actions go through an in-page dialog: Cancel sends
// nothing, OK sends exactly one request.  The server's answer is shown in
// the page: its "error" field when refused.
"use strict";

(function (TP) {
  const TOKEN_KEY = "twinproxy-dashboard-token";
  let busy = false;   // one action at a time: a double click sends one request

  function storedToken() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ""; } catch (err) { return ""; }
  }

  function storeToken(token) {
    try {
      if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
      else window.sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) { /* storage refused (private mode): the token lives until the page is closed */ }
    memoryToken = token;
  }

  let memoryToken = "";

  TP.setupAdmin = function () {
    memoryToken = storedToken();
    document.getElementById("token-slot").appendChild(document.getElementById("tpl-token").content.cloneNode(true));
    document.body.appendChild(document.getElementById("tpl-confirm").content.cloneNode(true));
    const form = TP.byTestId("token-form"), input = TP.byTestId("token-input");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      storeToken(input.value.trim());
      input.value = "";
      showTokenStatus();
    });
    TP.byTestId("token-forget").addEventListener("click", () => { storeToken(""); showTokenStatus(); });
    showTokenStatus();
  };

  function showTokenStatus() {
    const has = !!memoryToken;
    TP.setText(TP.byTestId("token-status"), has ? "token set" : "enter the dashboard's token to make changes");
    TP.setAttr(TP.byTestId("token-form"), "data-token", has ? "set" : "missing");
    TP.show(TP.byTestId("token-forget"), has);
  }

  // The outcome of an action, in the page (copyable text).
  TP.report = function (ok, text) {
    const box = document.getElementById("action-result");
    box.dataset.outcome = ok ? "ok" : "error";
    box.className = ok ? "ok" : "error";
    TP.setText(box, text);
    box.hidden = false;
  };

  // The in-page confirmation: resolves true (OK) or false (Cancel, Escape).
  TP.confirmDialog = function (text, body, danger) {
    const dialog = TP.byTestId("confirm-dialog");
    TP.setText(TP.byTestId("confirm-text"), text);
    TP.setText(TP.byTestId("confirm-body"), body);
    dialog.classList.toggle("danger", !!danger);
    dialog.hidden = false;
    const ok = TP.byTestId("confirm-ok"), cancel = TP.byTestId("confirm-cancel");
    cancel.focus();
    return new Promise((resolve) => {
      function done(answer) {
        ok.removeEventListener("click", onOk);
        cancel.removeEventListener("click", onCancel);
        document.removeEventListener("keydown", onKey);
        dialog.hidden = true;
        resolve(answer);
      }
      function onOk() { done(true); }
      function onCancel() { done(false); }
      function onKey(event) { if (event.key === "Escape") done(false); }
      ok.addEventListener("click", onOk);
      cancel.addEventListener("click", onCancel);
      document.addEventListener("keydown", onKey);
    });
  };

  // POST `body` to `path`; resolves the answer's JSON when accepted, null otherwise (shown in the page).
  // options: confirm (a question: asked first), danger (the dialog in red), quiet (no "ok" line).
  TP.post = async function (path, body, options) {
    const opts = options || {};
    if (busy) return null;
    if (!memoryToken) {
      TP.report(false, "no token: enter the dashboard's token first");
      TP.byTestId("token-input").focus();
      return null;
    }
    busy = true;
    try {
      if (opts.confirm) {
        const yes = await TP.confirmDialog(opts.confirm, "POST " + path + "\n" + JSON.stringify(body, null, 1),
          opts.danger);
        if (!yes) { TP.report(true, "cancelled: nothing was sent"); return null; }
      }
      document.body.dataset.posts = String(Number(document.body.dataset.posts || 0) + 1);
      let response;
      try {
        response = await fetch(path, {
          method: "POST", cache: "no-store",
          headers: { "Content-Type": "application/json", "Authorization": "Bearer " + memoryToken },
          body: JSON.stringify(body),
        });
      } catch (err) {
        TP.report(false, "POST " + path + " failed: " + err.message);
        return null;
      }
      let answer = null;
      try { answer = await response.json(); } catch (err) { answer = null; }
      if (!response.ok) {
        const message = answer && answer.error ? answer.error : "HTTP " + response.status;
        TP.report(false, path + ": " + message + " (" + response.status + ")");
        if (response.status === 401 || response.status === 403) TP.byTestId("token-form").dataset.token = "refused";
        return null;
      }
      if (!opts.quiet) TP.report(true, path + ": ok" + (answer && answer.generation ? ", generation " + answer.generation : ""));
      TP.pollSoon();
      return answer || {};
    } finally {
      busy = false;
    }
  };

  // A button that runs `run` when clicked (admin pages only create them).
  TP.actionButton = function (label, testid, run) {
    const button = TP.h("button", { type: "button", "data-testid": testid, text: label });
    button.addEventListener("click", (event) => { event.preventDefault(); run(); });
    return button;
  };
})(window.TP);
