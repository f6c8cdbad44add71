"""The ``twinproxy-admin`` command: verbs over the dashboard's HTTP API (contract §6).

Owns the command line (:func:`parser`; the global options are accepted
after the verb too, as in ``status --json``), the map from each verb to its
API request (:data:`VERBS`) and :func:`main`'s exit statuses: 0 done, 1 the
operation failed (``twinproxy-admin: <the API's reason>`` on stderr), 2 a
usage error (bad arguments, an unreadable token file), 3 the dashboard is
unreachable.  ``--json`` prints the API's object exactly as it came (a
refusal's ``{"error": ...}`` object too, besides the line on stderr).
Blocking I/O is fine here: this is a short-lived command, not the reactor.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from twinproxy import __version__
from twinproxy.admin_cli import adopt, migrations, render
from twinproxy.admin_cli.http import DashboardClient, Refused, Unreachable, segment

PROG = "twinproxy-admin"
DEFAULT_DASHBOARD = "127.0.0.1:18080"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageProblem(Exception):
    """A usage error found after parsing (exit 2)."""


def _gid(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"group id {text!r} is not a number")
    return int(text)


def _gid_or_offline(text: str) -> Optional[int]:
    if text.lower() in ("offline", "none", "null"):
        return None
    return _gid(text)


def _range(text: str) -> Tuple[int, int]:
    from twinproxy.cluster.slots import parse_range

    try:
        return parse_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _common(defaults: bool) -> argparse.ArgumentParser:
    """The global options; after the verb (``defaults`` False) they override only when given."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    common.add_argument("--dashboard", metavar="HOST:PORT", default=default(DEFAULT_DASHBOARD),
                        help=f"the dashboard's address (default: {DEFAULT_DASHBOARD})")
    common.add_argument("--token-file", metavar="FILE", default=default(None),
                        help="the write token (the content of the dashboard's --token-file); writes need it")
    common.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON object instead of text")
    common.add_argument("--timeout", type=_positive, default=default(60.0), metavar="SECONDS",
                        help="how long to wait for the dashboard's answer (default: 60)")
    return common


def parser() -> argparse.ArgumentParser:
    after = [_common(False)]
    main = argparse.ArgumentParser(prog=PROG, parents=[_common(True)],
                                   description="Administer a twinproxy cluster through its dashboard.",
                                   epilog="exit status: 0 ok, 1 the operation failed, 2 usage error, "
                                   "3 dashboard unreachable")
    main.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    verbs = main.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(parent: Any, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=after, help=text, description=text)

    def nouns(name: str, text: str) -> Any:
        return verb(verbs, name, text).add_subparsers(dest="action", metavar="ACTION", required=True)

    verb(verbs, "status", "the cluster: groups, servers, slots, proxies, generation")

    group = nouns("group", "add or remove a server group")
    verb(group, "add", "add an empty group").add_argument("gid", type=_gid, metavar="GID")
    verb(group, "remove", "remove a group (refused while it owns slots)").add_argument("gid", type=_gid,
                                                                                      metavar="GID")
    server = nouns("server", "add, remove or promote a group's server")
    for action, text in (("add", "add a server (the first is the master, later ones replicas)"),
                         ("remove", "remove a server from its group"),
                         ("promote", "make a replica the group's master (its slots held meanwhile)")):
        command = verb(server, action, text)
        command.add_argument("gid", type=_gid, metavar="GID")
        command.add_argument("addr", type=_address, metavar="ADDR")

    slots = nouns("slots", "assign, show or rebalance slots")
    assign = verb(slots, "assign", "give slots FIRST-LAST to group GID ('offline': to none)")
    assign.add_argument("range", type=_range, metavar="FIRST-LAST")
    assign.add_argument("gid", type=_gid_or_offline, metavar="GID")
    assign.add_argument("--force", action="store_true", help="also take slots another group owns")
    verb(slots, "show", "the slot runs (all, or FIRST-LAST)").add_argument("range", type=_range, nargs="?",
                                                                          metavar="FIRST-LAST")
    rebalance = verb(slots, "rebalance", "spread the slots evenly: place the offline ones, queue a migration "
                     "(with its keys, online) for each range that moves")
    rebalance.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rebalance.add_argument("--keys-per-second", type=_count, metavar="N",
                           help="each migration moves at most N keys a second")
    rebalance.add_argument("--parallel", type=_count, metavar="N", help="MIGRATE batches in flight at once")
    migrate = verb(slots, "migrate", "move slots FIRST-LAST, with their keys, to group GID (online; queued; a "
                                     "memcache cluster's warm up there instead)")
    migrate.add_argument("range", type=_range, metavar="FIRST-LAST")
    migrate.add_argument("gid", type=_gid, metavar="GID")
    migrate.add_argument("--keys-per-second", type=_count, metavar="N", help="move at most N keys a second")
    migrate.add_argument("--parallel", type=_count, metavar="N", help="MIGRATE batches in flight at once")
    migrate.add_argument("--warmup-seconds", type=_seconds, metavar="N",
                         help="memcache clusters: warm the slots up on the new group for N seconds (default 60)")

    migration = nouns("migration", "follow, pause, resume or cancel slot migrations")
    verb(migration, "status", "every migration: state, keys moved and left, rate, ETA, last error")
    for action, text in (("pause", "stop moving keys (requests still move the keys they touch)"),
                         ("resume", "go on moving keys"),
                         ("cancel", "stop; a migration already moving keys moves them back first"),
                         ("wait", "wait until the migrations end (exit 0: all finished)")):
        command = verb(migration, action, text + " (ID, or every migration not ended)")
        command.add_argument("id", type=_count, nargs="?", metavar="ID")

    proxy = nouns("proxy", "list or remove proxies")
    verb(proxy, "list", "the registered proxies")
    remove = verb(proxy, "remove", "remove a proxy's registration (a dead one: --force)")
    remove.add_argument("id", metavar="ID")
    remove.add_argument("--force", action="store_true", help="even if its address still answers")

    adopt = verb(verbs, "adopt", "take a running twemproxy pool into this cluster (groups, slots and paused "
                 "adoptions in one generation) and write the pool file its proxies switch to; after an "
                 "adoption entry was cancelled or failed, --resume (or the rewritten pool file) queues the "
                 "servers whose keys have not moved again")
    adopt.add_argument("--pool-file", metavar="FILE",
                       help="the pool file the proxies serve (required unless --resume; a pool in it that "
                       "follows the cluster already means --resume)")
    adopt.add_argument("--pool", metavar="NAME", help="the pool to adopt (required with --pool-file)")
    adopt.add_argument("--coordinator", metavar="URL",
                       help="the coordinator URL the proxies will follow (written into the pool file; required "
                       "for a first adoption)")
    adopt.add_argument("--cluster", metavar="NAME",
                       help="the cluster's name (default: the pool's; required with --resume)")
    adopt.add_argument("--resume", action="store_true",
                       help="queue again the adopted pool's servers whose keys have not moved (after a cancel or "
                       "a failure), paused, from the placement the cluster keeps: no pool file")
    adopt.add_argument("--keys-per-second", type=_count, metavar="N",
                       help="Redis pools: each server's sweep moves at most N keys a second (a resume: default "
                       "the adoption's last rate)")
    adopt.add_argument("--warmup-seconds", type=_seconds, metavar="N",
                       help="memcached pools: each server's items warm up at their new servers for N seconds "
                       "(default 60; a resume: the adoption's last)")
    adopt.add_argument("--output", metavar="PATH",
                       help="write the new pool file there (may be FILE itself; default: print it)")

    sentinel = nouns("sentinel", "add or remove a Redis Sentinel")
    for action, text in (("add", "have a sentinel monitor every group's master"),
                         ("remove", "make a sentinel forget the cluster")):
        verb(sentinel, action, text).add_argument("addr", type=_address, metavar="ADDR")
    return main


# A request: (method, path, body or None, query or None); and how its answer is shown.
Request = Tuple[str, str, Optional[Dict[str, Any]], Optional[Dict[str, Any]]]


def request_for(args: argparse.Namespace) -> Tuple[Request, Callable[[Dict[str, Any]], str]]:
    """The API request a parsed command line makes, and the text its answer is shown as."""
    verb, action = args.verb, getattr(args, "action", None)
    if verb == "adopt":     # its body comes from the pool file (adopt.prepare), its answer from adopt.run
        return ("POST", "/api/adopt", None, None), str
    if verb == "status":
        return ("GET", "/api/status", None, None), render.status_text
    if verb == "group":
        if action == "add":
            return ("POST", "/api/groups", {"id": args.gid}, None), _done(f"group {args.gid} added")
        return ("DELETE", f"/api/groups/{args.gid}", None, None), _done(f"group {args.gid} removed")
    if verb == "server":
        if action == "add":
            return (("POST", f"/api/groups/{args.gid}/servers", {"addr": args.addr}, None),
                    lambda r: render.done_text(f"{args.addr} added to group {args.gid} as its "
                                               f"{r.get('role', 'server')}", r))
        if action == "remove":
            return (("DELETE", f"/api/groups/{args.gid}/servers/{segment(args.addr)}", None, None),
                    _done(f"{args.addr} removed from group {args.gid}"))
        return (("POST", f"/api/groups/{args.gid}/promote", {"addr": args.addr}, None),
                _done(f"{args.addr} is the master of group {args.gid}"))
    if verb == "slots":
        if action == "assign":
            first, last = args.range
            owner = f"group {args.gid}" if args.gid is not None else "offline"
            return (("POST", "/api/slots/assign", {"first": first, "last": last, "group": args.gid,
                                                   "force": bool(args.force)}, None),
                    _done(f"slots {first}-{last}: {owner}"))
        if action == "show":
            query = None if args.range is None else {"first": args.range[0], "last": args.range[1]}
            return ("GET", "/api/slots", None, query), render.slots_text
        if action == "migrate":
            first, last = args.range
            body = {"first": first, "last": last, "group": args.gid, "keys_per_second": args.keys_per_second,
                    "parallel": args.parallel}
            if args.warmup_seconds is not None:
                body["warmup_seconds"] = args.warmup_seconds
            return ("POST", "/api/slots/migrate", body, None), migrations.created_text
        body = {"dry_run": bool(args.dry_run)}
        for name in ("keys_per_second", "parallel"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        return ("POST", "/api/slots/rebalance", body, None), render.plan_text
    if verb == "migration":
        if action in ("status", "wait"):
            return ("GET", "/api/migrations", None, None), migrations.status_text
        path = "/api/migrations" + (f"/{args.id}" if args.id is not None else "") + f"/{action}"
        return ("POST", path, None, None), migrations.action_text(action)
    if verb == "proxy":
        if action == "list":
            return ("GET", "/api/proxies", None, None), render.proxies_text
        query = {"force": 1} if args.force else None
        return ("DELETE", f"/api/proxies/{segment(args.id)}", None, query), _done(f"proxy {args.id} removed")
    if action == "add":
        return ("POST", "/api/sentinels", {"addr": args.addr}, None), _done(f"sentinel {args.addr} added")
    return ("DELETE", f"/api/sentinels/{segment(args.addr)}", None, None), _done(f"sentinel {args.addr} removed")


def _done(what: str) -> Callable[[Dict[str, Any]], str]:
    return lambda result: render.done_text(what, result)


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as token_file:
            token = token_file.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageProblem(f"cannot read the token file {path}: {getattr(err, 'strerror', None) or err}")
    if not token:
        raise UsageProblem(f"the token file {path} is empty")
    if any(not 32 < ord(char) < 127 for char in token):
        raise UsageProblem(f"the token in {path} must be printable ASCII without spaces (one line)")
    return token


def main(argv: Optional[List[str]] = None, out: Any = None, err: Any = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:   # --help, --version (0) and usage errors (2)
        return int(done.code or 0)
    try:
        (method, path, body, query), show = request_for(args)
        token = read_token(args.token_file) if args.token_file is not None and method != "GET" else None
        client = DashboardClient(args.dashboard, token, args.timeout)
        adoption = adopt.prepare(args) if args.verb == "adopt" else None
    except (UsageProblem, ValueError, adopt.AdoptProblem) as problem:
        print(f"{PROG}: {problem}", file=err)
        return EXIT_USAGE
    try:
        if adoption is not None:
            return adopt.run(client, args, *adoption, out, err)
        if args.verb == "migration" and getattr(args, "action", None) == "wait":
            return migrations.wait(client, args.id, out, err, args.json, unreachable=Unreachable,
                                   patience=args.timeout)
        result = client.request(method, path, body, query)
    except Unreachable as problem:
        print(f"{PROG}: {problem}", file=err)
        return EXIT_UNREACHABLE
    except Refused as refused:
        if args.json:   # the API's error object, for scripts; the reason goes to stderr all the same
            out.write(json.dumps(refused.body, indent=2) + "\n")
        lines = render.error_lines(refused)
        if refused.status in (401, 403) and token is None:   # 403 since the web dashboard; 401 before
            lines[0] += " (give --token-file FILE)"
        for line in lines:
            print(f"{PROG}: {line}", file=err)
        return EXIT_FAILED
    if args.json:
        shown = (result.get("migrations", []) if (args.verb, getattr(args, "action", None)) == ("migration", "status")
                 else result)
        out.write(json.dumps(shown, indent=2) + "\n")
    else:
        out.write(show(result))
    for warning in render.problems(result):
        print(f"{PROG}: warning: {warning}", file=err)
    return EXIT_OK
