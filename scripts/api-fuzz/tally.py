"""The tally of an api-fuzz run (scripts/api-fuzz/run).

Reads the HAR files of the Schemathesis passes, then asks the controller
(with a token no pass could guess) for its stored change records and its
audit trail's, and compares them. Prints one line per figure; exits 1 unless
5xx, crashes, 4xx without a JSON error and committed-but-unaudited are all 0.

usage: tally.py URL TOKEN ALIVE(0|1) HAR...
"""
import collections
import json
import sys
import urllib.request


def get(url, token, path):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def main():
    url, token, alive, hars = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
    tried = ok = json_4xx = bare_4xx = server_errors = transport = 0
    statuses = collections.Counter()
    bare_examples = []
    for path in hars:
        try:
            entries = json.load(open(path))["log"]["entries"]
        except (OSError, ValueError, KeyError):
            continue
        for e in entries:
            tried += 1
            code = e["response"]["status"]
            statuses[code] += 1
            if code == 0:
                transport += 1
            elif code < 400:
                ok += 1
            elif code < 500:
                text = e["response"].get("content", {}).get("text") or ""
                try:
                    body = json.loads(text)
                    good = isinstance(body, dict) and isinstance(body.get("error"), str)
                except ValueError:
                    good = False
                if good:
                    json_4xx += 1
                else:
                    bare_4xx += 1
                    if len(bare_examples) < 5:
                        bare_examples.append((e["request"]["method"], e["request"]["url"], code, text[:120]))
            else:
                server_errors += 1
    crashes = 0 if alive else 1
    # Committed but unaudited: every change record in the store must be in
    # the trail (the store is what took effect).
    stored = get(url, token, "/v1/changes") if alive else []
    logged = []
    if alive:
        records = get(url, token, "/v1/flows?changes=true&limit=100000")["records"]
        logged = [r["record"] for r in records if r["record"].get("kind") == "change"]
    key = lambda c: json.dumps({k: c.get(k) for k in ("time_ns", "actor", "action", "resource", "diff", "policy_version")}, sort_keys=True)
    in_trail = collections.Counter(key(c) for c in logged)
    unaudited = 0
    for c in stored:
        if in_trail[key(c)] > 0:
            in_trail[key(c)] -= 1
        else:
            unaudited += 1
    not_in_store = sum(in_trail.values())
    print("api-fuzz tally:")
    print(f"  requests tried:                    {tried}")
    print(f"  2xx/3xx:                           {ok}")
    print(f"  4xx with a JSON error:             {json_4xx}")
    print(f"  4xx without a JSON error:          {bare_4xx}")
    print(f"  5xx:                               {server_errors}")
    print(f"  transport errors (no answer):      {transport}")
    print(f"  crashes:                           {crashes}")
    print(f"  changes committed:                 {len(stored)}")
    print(f"  committed-but-unaudited changes:   {unaudited}")
    print(f"  trail change records not in store: {not_in_store}")
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    for ex in bare_examples:
        print(f"  a 4xx without a JSON error: {ex}")
    bad = server_errors or crashes or bare_4xx or unaudited or not_in_store or transport or not alive or tried == 0
    sys.exit(1 if bad else 0)


main()
