"""``twinproxy-admin adopt``: take a running twemproxy pool into a cluster, and rewrite its pool file.

A Redis pool's keys are moved (``--keys-per-second``); a memcached pool's,
into a memcache cluster, warmed up at their new servers (``--warmup-seconds``,
default 60): each option is refused for the other protocol.

Owns :func:`adoption_request` (the pool file's pool, checked, as ``POST
/api/adopt``'s body), :func:`cluster_file` (the pool file with that pool
following the cluster instead of listing servers), :func:`resume_request`
(the body that resumes an adoption after an entry was cancelled or failed:
``--resume``, or the rewritten pool file given again, whose pool follows
the cluster), :func:`prepare` / :func:`run` (the verb: the request, the
file written atomically, the next steps printed by :func:`next_steps` with
this run's own dashboard, token file and adoption ids), :func:`tag_warning`
(a pool whose hash tag is not ``{}``: adopted, but some of its multi-key
commands will be refused) and :class:`AdoptProblem` (a pool that cannot be
adopted, options that do not go together: a usage error).
Blocking I/O is fine here: this is a short-lived command.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import yaml

from twinproxy.cluster.migrations import DEFAULT_WARMUP
from twinproxy.config import NOT_IN_CLUSTER, ConfigError, PoolConfig, load_file

# A cluster's hash tag (its slots group keys by it, as Codis and Redis Cluster do), and the multi-key
# commands a cluster pool splits by key rather than refuse across slots.
CLUSTER_TAG = "{}"
SPLIT_COMMANDS = ("MGET", "MSET", "DEL", "UNLINK", "EXISTS", "TOUCH")


class AdoptProblem(Exception):
    """The pool file or the pool cannot be adopted (exit 2)."""


def find_pool(path: str, name: str) -> PoolConfig:
    try:
        pools = load_file(path)
    except ConfigError as err:
        raise AdoptProblem(str(err))
    for pool in pools:
        if pool.name == name:
            return pool
    raise AdoptProblem(f"{path} has no pool '{name}' (its pools: {', '.join(pool.name for pool in pools)})")


def adoption_request(pool: PoolConfig) -> Dict[str, Any]:
    """``POST /api/adopt``'s body for ``pool``; AdoptProblem says why it cannot be adopted."""
    what = f"pool '{pool.name}'"
    if pool.cluster_mode:
        raise AdoptProblem(f"{what} follows cluster '{pool.cluster}' already")
    if pool.sentinel_mode:
        raise AdoptProblem(f"{what} follows Sentinel (sentinels:): adopting Sentinel pools is not supported yet")
    if pool.distribution == "random":
        raise AdoptProblem(f"{what} uses distribution random: a key may be on any server, so there is nowhere "
                           "to move it from")
    if pool.auto_eject_hosts:
        raise AdoptProblem(f"{what} has auto_eject_hosts: true: keys written while a server was ejected sit on "
                           "another server, and adopt assumes each key is where the full ring puts it; set it "
                           "false and reload the proxies first")
    if pool.redis and pool.redis_db:
        raise AdoptProblem(f"{what} uses redis_db {pool.redis_db}: a cluster lives in database 0")
    servers = []
    for spec in pool.servers:
        if spec.path is not None:
            needs = "MIGRATE needs" if pool.redis else "a cluster's groups need"
            raise AdoptProblem(f"{what}: server {spec.path} is a unix socket: {needs} a TCP address")
        servers.append({"address": spec.address, "name": spec.name, "weight": spec.weight})
    addresses = [server["address"] for server in servers]
    if len(set(addresses)) != len(addresses):
        raise AdoptProblem(f"{what} lists a server twice")
    return {"pool": pool.name, "hash": pool.hash, "distribution": pool.distribution, "hash_tag": pool.hash_tag,
            "servers": servers, "protocol": "redis" if pool.redis else "memcache"}


class _PlainDumper(yaml.SafeDumper):
    """Writes every string as the proxy (and nutcracker) will read it back: no YAML 1.1 types, so a value
    like ``0123``, ``12:30`` or ``yes`` stays plain and means the same string again."""


_PlainDumper.yaml_implicit_resolvers = {}
# An empty value quoted, as safe_dump wrote it (plain, ``key:`` alone reads as empty only to some readers).
_PlainDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="'" if not text else None))


def cluster_file(path: str, name: str, cluster: str, coordinator: str) -> str:
    """The pool file's text with pool ``name`` following ``cluster`` (its ring keys gone).

    Read as the proxy reads it, every scalar a string: ``safe_load`` would turn ``redis_auth: 0123`` into 83
    and ``12:30`` into 750, and the proxies would then log in with another password."""
    with open(path, encoding="utf-8") as handle:
        document = yaml.load(handle, Loader=yaml.BaseLoader)
    body = dict(document[name])
    for key in NOT_IN_CLUSTER:
        body.pop(key, None)
    body["cluster"] = cluster
    body["coordinator"] = coordinator
    document[name] = body
    return yaml.dump(document, Dumper=_PlainDumper, default_flow_style=False, sort_keys=False, allow_unicode=True)


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".adopt-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        if os.path.exists(path):
            os.chmod(temporary, os.stat(path).st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def resume_request(cluster: str, pool: Optional[str], keys_per_second: Optional[int],
                   warmup_seconds: Optional[int] = None) -> Dict[str, Any]:
    """``POST /api/adopt``'s body that resumes an adoption from the placement the cluster keeps."""
    body: Dict[str, Any] = {"resume": True, "cluster": cluster}
    if pool is not None:
        body["pool"] = pool
    if keys_per_second is not None:
        body["keys_per_second"] = keys_per_second
    if warmup_seconds is not None:
        body["warmup_seconds"] = warmup_seconds
    return body


def prepare(args: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """The request body and the new pool file's text (None for a resume: nothing to write; nothing written
    yet); AdoptProblem for a bad pool or a bad combination of options."""
    rate = getattr(args, "keys_per_second", None)
    warmup = getattr(args, "warmup_seconds", None)
    if args.resume:
        if args.pool_file is not None:
            raise AdoptProblem("--resume takes no --pool-file (the cluster keeps the pool's placement); or give the "
                               "rewritten pool file without --resume")
        if args.output is not None:
            raise AdoptProblem("--resume writes no pool file: the pool's file follows the cluster already (drop "
                               "--output)")
        if args.cluster is None:
            raise AdoptProblem("--resume needs --cluster NAME: the cluster that adopted the pool")
        return resume_request(args.cluster, args.pool, rate, warmup), None
    if args.pool_file is None or args.pool is None:
        raise AdoptProblem("adopt needs --pool-file FILE and --pool NAME (or, to resume an adoption, --resume "
                           "--cluster NAME)")
    pool = find_pool(args.pool_file, args.pool)
    if pool.cluster_mode:
        # The file adopt rewrote: the pool follows its cluster already, so this can only mean a resume.
        for option, given, found in (("--cluster", args.cluster, pool.cluster),
                                     ("--coordinator", args.coordinator, pool.coordinator)):
            if given is not None and given != found:
                raise AdoptProblem(f"pool '{pool.name}' follows cluster '{pool.cluster}' at {pool.coordinator} "
                                   f"already, not {option} {given}: nothing to adopt (to resume its adoption, "
                                   "give the file's cluster)")
        return resume_request(pool.cluster, pool.name, rate, warmup), None
    if args.coordinator is None:
        raise AdoptProblem("adopt needs --coordinator URL: the coordinator the proxies will follow (written into "
                           "the pool file)")
    body = adoption_request(pool)
    body["cluster"] = args.cluster or args.pool
    if pool.redis and warmup is not None:
        raise AdoptProblem(f"pool '{pool.name}' is a Redis pool: its keys are moved, not warmed up (drop "
                           "--warmup-seconds; --keys-per-second tunes the sweeps)")
    if not pool.redis and rate is not None:
        raise AdoptProblem(f"pool '{pool.name}' is a memcached pool: its items are not moved but warmed up at "
                           "their new servers (drop --keys-per-second; --warmup-seconds says for how long)")
    if rate is not None:
        body["keys_per_second"] = rate
    if not pool.redis:
        body["warmup_seconds"] = DEFAULT_WARMUP if warmup is None else warmup
    return body, cluster_file(args.pool_file, args.pool, args.cluster or args.pool, args.coordinator)


def tag_warning(pool: str, hash_tag: Optional[str]) -> Optional[str]:
    """What the operator must know when pool ``pool``'s hash tag is not a cluster's ``{}``; None when it is."""
    if hash_tag == CLUSTER_TAG:
        return None
    if hash_tag is None:
        what = f"pool '{pool}' has no hash_tag"
        relied = "whose keys it happened to place on one server"
    else:
        what = f"pool '{pool}' has hash_tag \"{hash_tag}\""
        relied = f"whose keys it kept together by a {hash_tag[0]}...{hash_tag[1]} tag"
    return (f"warning: {what}, but a cluster groups keys by {{...}} only: from the switch on, a multi-key "
            f"command {relied} is refused (CROSSSLOT) unless its keys share a {{...}} tag "
            f"({', '.join(SPLIT_COMMANDS)} are split by key and still served)")


def next_steps(args: Any, ids: List[str], generation: Any = None, switch: bool = True) -> str:
    """The commands that finish the adoption, with this run's dashboard, token file and adoption ids;
    ``switch``: the proxies must reload the rewritten file first (False: they follow the cluster already)."""
    admin = f"twinproxy-admin --dashboard {shlex.quote(args.dashboard)}"
    writes = admin + (f" --token-file {shlex.quote(args.token_file)}" if args.token_file is not None else "")
    named = (f"resumes adoption {ids[0]}" if len(ids) == 1 else
             f"resumes adoptions {', '.join(ids)}: one at a time" if ids else "resumes every paused migration")
    if switch:
        reload = (f"reload {shlex.quote(args.output)}" if args.output is not None
                  else "install the pool file above and reload it")
        steps = [f"every proxy serving pool '{args.pool}': {reload} (kill -HUP, or POST /reload)",
                 f"{admin} proxy list   (each of them registered, at generation {generation} or later)"]
    else:
        steps = [f"{admin} proxy list   (every proxy serving the pool registered: they follow the cluster)"]
    steps += [f"{writes} migration resume   ({named}; no key moves before this)", f"{admin} migration wait"]
    return "next:\n" + "".join(f"  {number}. {step}\n" for number, step in enumerate(steps, 1))


def run(client: Any, args: Any, body: Dict[str, Any], text: Optional[str], out: Any, err: Any) -> int:
    """POST the adoption; write (or print) the new pool file; say what comes next."""
    # Before asking: the operator learns it even if the dashboard refuses (a warning, not a refusal).  A
    # resume names no hash tag: its first adoption warned.
    # A memcache cluster refuses no multi-key command (a get is split by key): nothing to warn of.
    warning = (tag_warning(body["pool"], body["hash_tag"]) if "hash_tag" in body and body.get("protocol") != "memcache"
               else None)
    if warning is not None:
        print(f"twinproxy-admin: {warning}", file=err)
    result = client.request("POST", "/api/adopt", body, None)
    if text is None:
        return _resumed(args, body, result, out)
    if args.output is not None:
        try:
            write_atomically(args.output, text)
        except OSError as problem:
            print(f"twinproxy-admin: the adoption is written (paused), but {args.output} could not be: "
                  f"{problem.strerror or problem}; the pool file to switch to:\n\n{text}", file=err)
            return 1
    adoptions: List[Dict[str, Any]] = result.get("migrations") or [result.get("migration") or {}]
    ids = [str(m.get("id")) for m in adoptions]
    if args.json:
        out.write(json.dumps({"migrations": adoptions, "migration": adoptions[0] if adoptions else None,
                              "generation": result.get("generation"), "resumed": bool(result.get("resumed")),
                              "pool_file": args.output, "warnings": [warning] if warning is not None else []},
                             indent=2) + "\n")
        return 0
    generation = result.get("generation")
    if result.get("resumed"):     # the original pool file, given again: the dashboard resumed
        out.write(_queued_text(body["pool"], body["cluster"], result))
    else:
        out.write(f"pool '{args.pool}' adopted by cluster '{args.cluster or args.pool}' (generation {generation}): "
                  f"{len(body['servers'])} groups, adoptions {', '.join(ids)} queued, paused\n")
    if args.output is not None:
        out.write(f"wrote {args.output} (YAML comments are not kept)\n")
    else:
        out.write("the pool file to switch to:\n\n" + text + "\n")
    out.write(next_steps(args, ids, generation))
    return 0


def _queued_text(pool: Optional[str], cluster: str, result: Dict[str, Any]) -> str:
    queued = result.get("migrations") or []
    done = result.get("done") or []
    pool = result.get("pool") or pool
    entries = ", ".join(f"{m.get('id')} (group {m.get('from_group')})" for m in queued)
    rate = queued[0].get("keys_per_second") if queued else None
    warmup = queued[0].get("warmup_seconds") if queued else None
    return (f"the adoption of pool '{pool}' by cluster '{cluster}' resumed (generation {result.get('generation')}):"
            f" adoptions {entries} queued, paused, "
            + (f"warming up for {warmup}s each" if warmup is not None else
               f"at most {rate} keys/s each" if rate is not None else "no rate limit")
            + ("; the keys of group" + ("s " if len(done) > 1 else " ") + ", ".join(map(str, done))
               + " have moved already" if done else "") + "\n")


def _resumed(args: Any, body: Dict[str, Any], result: Dict[str, Any], out: Any) -> int:
    if args.json:
        queued = result.get("migrations") or []
        out.write(json.dumps({"migrations": queued, "migration": queued[0] if queued else None,
                              "generation": result.get("generation"), "resumed": True, "done": result.get("done"),
                              "pool_file": None}, indent=2) + "\n")
        return 0
    out.write(_queued_text(body.get("pool"), body["cluster"], result))
    out.write(next_steps(args, [str(m.get("id")) for m in result.get("migrations") or []], switch=False))
    return 0


__all__ = ["AdoptProblem", "adoption_request", "cluster_file", "next_steps", "prepare", "resume_request", "run",
           "tag_warning", "write_atomically"]
