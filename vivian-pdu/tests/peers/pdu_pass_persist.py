#!/usr/bin/env python3
"""net-snmp pass_persist handler: a writable SNMP table kept in a JSON file.

Usage (snmpd.conf): pass_persist ROOT /usr/bin/python3 THIS_SCRIPT ROOT
with PDU_STATE=/path/to/state.json in snmpd's environment.

The state file (re-read on every request, so a test can edit it):
  "values":  {".1.3.6...N": ["integer", 1] | ["string", "label"]}
  "columns": {".1.3.6...col": {"allowed": [1, 2, 3],
                                "target": ".1.3.6...status_col",   # optional
                                "effects": {"3": 1}}}              # optional
  "log":     [[".1.3.6...N", 2], ...]   # every accepted SET, appended
A SET under a column listed in "columns" with an allowed INTEGER is logged,
then stored at target+index (default: the OID itself) as effects[value]
(default: the value), and at the OID itself. Anything else is refused like a
real agent would. snmpd GETs an OID before it SETs it: a control column must
have values to be writable.
Written for Vivian's tests; the idea comes from apc_pass_persist.py.
"""
import json
import os
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else "."
STATE = os.environ.get("PDU_STATE", "pdu_state.json")


def key(oid):
    return tuple(int(p) for p in oid.strip(".").split(".") if p != "")


def load():
    with open(STATE) as f:
        return json.load(f)


def save(state):
    tmp = STATE + ".tmp.%d" % os.getpid()
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, STATE)


def out(*lines):
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def under(oid, prefix):
    k, p = key(oid), key(prefix)
    return len(k) > len(p) and k[: len(p)] == p


def reply_value(oid, entry):
    typ, val = entry
    out(oid, typ, str(val))


def handle_get(state, oid):
    entry = state["values"].get(oid)
    if entry is None:
        out("NONE")
    else:
        reply_value(oid, entry)


def handle_getnext(state, oid):
    ref = key(oid)
    candidates = sorted(
        (key(o), o) for o in state["values"] if under(o, ROOT) and key(o) > ref
    )
    if not candidates:
        out("NONE")
    else:
        o = candidates[0][1]
        reply_value(o, state["values"][o])


def handle_set(state, oid, typ, val):
    for prefix, col in state.get("columns", {}).items():
        if under(oid, prefix) and len(key(oid)) == len(key(prefix)) + 1:
            break
    else:
        out("not-writable")
        return
    if typ != "integer":
        out("wrong-type")
        return
    try:
        v = int(val)
    except ValueError:
        out("wrong-value")
        return
    if v not in col.get("allowed", []):
        out("wrong-value")
        return
    index = oid.rsplit(".", 1)[1]
    target = col.get("target", prefix) + "." + index
    if target not in state["values"]:
        out("no-creation")
        return
    state.setdefault("log", []).append([oid, v])
    if target != oid:
        state["values"][oid] = ["integer", v]
    state["values"][target] = ["integer", col.get("effects", {}).get(str(v), v)]
    save(state)
    out("DONE")


def main():
    while True:
        cmd = sys.stdin.readline()
        if not cmd:
            break
        cmd = cmd.strip()
        if cmd == "":
            continue  # snmpd sends a blank line after the value of a SET
        if cmd == "PING":
            out("PONG")
            continue
        oid = sys.stdin.readline().strip()
        try:
            state = load()
        except Exception:
            out("NONE")
            continue
        if cmd == "get":
            handle_get(state, oid)
        elif cmd == "getnext":
            handle_getnext(state, oid)
        elif cmd == "set":
            typ, _, val = sys.stdin.readline().strip().partition(" ")
            handle_set(state, oid, typ, val)
        else:
            out("NONE")


if __name__ == "__main__":
    main()
