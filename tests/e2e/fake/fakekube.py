#!/usr/bin/env python3
"""A fake docker/kind/helm/kubectl for testing tests/e2e/run.sh itself without a cluster.

Installed as symlinks named docker, kind, helm and kubectl (see tests/e2e/selftest.sh).
It models just what run.sh touches: one RaftKV named "example" whose StatefulSet,
pods, volume claims and raft membership follow `kubectl apply` / `kubectl scale`
instantly, and `kubectl port-forward`, which starts a local HTTP server speaking the
node API subset run.sh uses (/v1/kv, raw GET, /v1/members, /v1/status, /metrics).
State lives in the JSON file $FAKE_STATE (flock-protected).

Fault knobs (environment):
  FAKE_AMNESIA=1      a deleted pod comes back with a new data-dir incarnation
  FAKE_PF_DIE=N       each port-forward dies at its N-th request (as when its pod goes)
  FAKE_503_EVERY=N    every N-th PUT answers 503 no_leader (as during a leader change)
  FAKE_DOCKER_DOWN=1  `docker info` fails (no engine)
  FAKE_BACKUP_FAIL=1  backup jobs never succeed
  FAKE_NO_RESTART=1   a changed pod template never reaches the pods (no operator roll)
  FAKE_RESTART_ALL=1  ... reaches them all at once (the StatefulSet shows 1 ready pod once)
Every invocation is appended to $FAKE_STATE.calls.
"""
import fcntl
import http.server
import json
import os
import random
import re
import sys

# The CRD's pattern for spec.storage.size (operator/src/crd.rs, STORAGE_SIZE_PATTERN).
STORAGE_SIZE_PATTERN = r"^(0*[1-9][0-9]*(\.[0-9]+)?|0*\.[0-9]*[1-9][0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"



def crd_schedule_pattern():
    """The CRD's pattern for spec.backup.schedule, read from deploy/crd.yaml (generated
    from operator/src/crd.rs, BACKUP_SCHEDULE_PATTERN; single-quoted YAML)."""
    crd = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "..", "deploy", "crd.yaml")
    with open(crd) as f:
        for line in f:
            line = line.strip()
            if line.startswith("pattern: '^(@(yearly"):
                return line[len("pattern: '"):-1].replace("''", "'")
    raise SystemExit("fake: no backup schedule pattern in deploy/crd.yaml")


BACKUP_SCHEDULE_PATTERN = crd_schedule_pattern()

STATE = os.environ["FAKE_STATE"]
NAME = "example"


def load():
    if os.path.exists(STATE):
        with open(STATE) as f:
            return json.load(f)
    return {"replicas": 0, "pods": {}, "kv": {}, "pvcs": [], "rkv": False, "puts": 0, "backup": False,
            "template": "0000000000000001"}


class Locked:
    """Read-modify-write of the state under an exclusive lock."""

    def __enter__(self):
        self.lock = open(STATE + ".lock", "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.state = load()
        return self.state

    def __exit__(self, *exc):
        with open(STATE + ".tmp", "w") as f:
            json.dump(self.state, f)
        os.replace(STATE + ".tmp", STATE)
        self.lock.close()


def new_incarnation():
    return "%016x" % random.getrandbits(64)


def set_replicas(s, n):
    s["replicas"] = n
    for i in range(n):
        pod = f"{NAME}-{i}"
        s["pods"].setdefault(pod, {"uid": str(random.random()), "inc": new_incarnation(), "template": s["template"]})
        if f"data-{pod}" not in s["pvcs"]:
            s["pvcs"].append(f"data-{pod}")
    for pod in list(s["pods"]):
        if int(pod.rsplit("-", 1)[1]) >= n:
            del s["pods"][pod]
            s["pvcs"].remove(f"data-{pod}")


class NodeAPI(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def count_request(self):
        self.server.requests += 1
        if self.server.requests == int(os.environ.get("FAKE_PF_DIE", "0")):
            os._exit(0)  # the tunnel breaks: the client sees an empty reply

    def do_PUT(self):
        self.count_request()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        key = self.path.split("?")[0].removeprefix("/v1/kv/")
        every = int(os.environ.get("FAKE_503_EVERY", "0"))
        with Locked() as s:
            s["puts"] += 1
            if every and s["puts"] % every == 0:
                return self.reply(503, b'{"error":"no leader","code":"no_leader"}')
            s["kv"][key] = body
        self.reply(204)

    def do_GET(self):
        self.count_request()
        s = load()
        path = self.path.split("?")[0]
        if path == "/v1/members":
            members = [{"id": i + 1, "peer_url": f"http://{NAME}-{i}.{NAME}-peer:2380",
                        "role": "voter", "is_leader": i == 0} for i in range(s["replicas"])]
            return self.reply(200, json.dumps({"leader": 1, "members": members}).encode())
        if path == "/v1/status":
            inc = s["pods"][self.server.pod]["inc"]
            return self.reply(200, json.dumps({"id": 1, "leader": 1, "incarnation": inc}).encode())
        if path == "/metrics":
            return self.reply(200, b"# TYPE raftkv_server_has_leader gauge\nraftkv_server_has_leader 1\n", "text/plain")
        if path.startswith("/v1/kv/"):
            key = path.removeprefix("/v1/kv/")
            if key not in s["kv"]:
                return self.reply(404, b'{"error":"key not found","code":"not_found"}')
            return self.reply(200, json.dumps({"key": key, "value": s["kv"][key], "revision": 1}).encode())
        key = path.lstrip("/")
        if key not in s["kv"]:
            return self.reply(404, b'{"error":"key not found","code":"not_found"}')
        self.reply(200, s["kv"][key].encode(), "text/plain")


def port_forward(target):
    pod = target.split("/", 1)[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NodeAPI)
    server.requests = 0
    server.pod = pod if pod.startswith(f"{NAME}-") else f"{NAME}-0"
    print(f"Forwarding from 127.0.0.1:{server.server_address[1]} -> 2379", flush=True)
    server.serve_forever()


def jsonpath(args):
    for i, a in enumerate(args):
        if a.startswith("-ojsonpath="):
            return a.split("=", 1)[1]
        if a == "-o" and i + 1 < len(args) and args[i + 1].startswith("jsonpath="):
            return args[i + 1].split("=", 1)[1]
    return None


def kubectl(args):
    if "-n" in args:
        i = args.index("-n")
        args = args[:i] + args[i + 2:]
    verb = args[0]
    if verb == "port-forward":
        return port_forward(next(a for a in args[1:] if "/" in a))
    jp = jsonpath(args)
    with Locked() as s:
        if verb == "apply" and "-f" in args and args[args.index("-f") + 1].endswith("examples/raftkv.yaml"):
            s["rkv"] = True
            set_replicas(s, 3)
        elif verb == "scale":
            n = next(a for a in args if a.startswith("--replicas=")).split("=")[1]
            set_replicas(s, int(n))
        elif verb == "patch" and "json" in args:
            # Only the removal of spec.backup: the operator deletes the CronJob.
            ops = json.loads(args[args.index("-p") + 1])
            if ops != [{"op": "remove", "path": "/spec/backup"}]:
                print(f"fake: unsupported JSON patch {ops}", file=sys.stderr)
                return 1
            s["backup"] = False
            print("raftkv.raftkv.dev/example patched")
        elif verb == "patch":
            # The CRD's CEL rules and bounds, as the API server would apply them.
            body = json.loads(args[args.index("-p") + 1])
            spec, refusals = body.get("spec", {}), []
            storage = spec.get("storage", {})
            if "storageClassName" in storage:
                refusals.append("spec.storage: Invalid value: \"object\": storage.storageClassName is immutable")
            if "size" in storage:
                refusals.append("spec.storage.size: Invalid value: \"string\": storage.size is immutable")
                if not re.match(STORAGE_SIZE_PATTERN, str(storage["size"])):
                    refusals.append(f"spec.storage.size: Invalid value: \"{storage['size']}\": spec.storage.size in body should match '{STORAGE_SIZE_PATTERN}'")
            if spec.get("imagePullPolicy", "Always") not in ("Always", "IfNotPresent", "Never"):
                refusals.append("spec.imagePullPolicy: Invalid value: \"string\": imagePullPolicy must be Always, IfNotPresent or Never")
            if not 1 <= spec.get("replicas", 1) <= 9:
                refusals.append("spec.replicas: Invalid value: should be less than or equal to 9")
            backup = spec.get("backup")
            if backup is not None and not re.match(BACKUP_SCHEDULE_PATTERN, str(backup.get("schedule", ""))):
                refusals.append(f"spec.backup.schedule: Invalid value: should match '{BACKUP_SCHEDULE_PATTERN}'")
            if refusals and not os.environ.get("FAKE_ACCEPT_BAD_SPEC"):
                print("The RaftKV \"example\" is invalid: " + ", ".join(refusals), file=sys.stderr)
                return 1
            if "resources" in spec:
                # A new pod template; the operator restarts every member onto it (new
                # pods, same volumes).
                s["template"] = "%016x" % random.getrandbits(64)
                if os.environ.get("FAKE_RESTART_ALL"):
                    s["dip"] = True
                if not os.environ.get("FAKE_NO_RESTART"):
                    for pod in s["pods"].values():
                        pod["uid"] = str(random.random())
                        pod["template"] = s["template"]
            if backup is not None:
                # The operator makes the CronJob and the claim; a job runs at once.
                s["backup"] = True
                if "example-backups" not in s["pvcs"]:
                    s["pvcs"].append("example-backups")
            print("raftkv.raftkv.dev/example patched")
        elif verb == "logs" and args[1] == "pod/example-backup-29000000-x7k2q":
            print('{"applied_index":42,"bytes":1234,"endpoint":"http://example.raftkv-e2e.svc:2379",'
                  '"file":"/backups/backup-20261207T000000Z-000000000000002a.raftkv","pruned":[]}')
        elif verb == "delete" and args[1] == "pod":
            pod = s["pods"][args[2]]
            pod["uid"] = str(random.random())  # the StatefulSet recreates it at once
            pod["template"] = s["template"]  # from the StatefulSet's current template
            if os.environ.get("FAKE_AMNESIA"):
                pod["inc"] = new_incarnation()
        elif verb == "delete" and args[1].startswith("rkv/"):
            s["rkv"] = False
            set_replicas(s, 0)
        elif verb == "get":
            what = args[1]
            if what.startswith("statefulset/"):
                if not s["rkv"]:
                    return 1
                if jp and "template-hash" in jp:
                    print(s["template"], end="")
                elif jp and "readyReplicas" in jp and s.get("dip"):
                    s["dip"] = False
                    print(1, end="")
                else:
                    print(s["replicas"] if jp else f"statefulset.apps/{NAME}", end="" if jp else "\n")
            elif what.startswith("rkv/"):
                print(s["replicas"], end="")
            elif what.startswith("pod/"):
                pod = s["pods"].get(what[4:])
                if pod is None:
                    return 1
                if "template-hash" in (jp or ""):
                    print(pod.get("template", ""), end="")
                elif "annotations" in (jp or ""):
                    print('{"prometheus.io/path":"/metrics","prometheus.io/port":"2379",'
                          '"prometheus.io/scrape":"true"}', end="")
                else:
                    print(pod["uid"], end="")
            elif what == "jobs":
                if s["backup"] and not os.environ.get("FAKE_BACKUP_FAIL"):
                    print("example-backup-29000000", end="")
            elif what.startswith("cronjob/"):
                if not s["backup"]:
                    return 1
                print("cronjob.batch/" + what[8:])
            elif what.startswith("pvc/"):
                if what[4:] not in s["pvcs"]:
                    return 1
                print("persistentvolumeclaim/" + what[4:])
            elif what == "pvc":
                names = [a for a in args[2:] if a.startswith("data-")]
                found = [n for n in names if n in s["pvcs"]]
                for n in found:
                    print("persistentvolumeclaim/" + n)
                return 0 if len(found) == len(names) else 1
            elif what == "pods" and "job-name=example-backup-29000000" in args:
                if "--field-selector=status.phase=Succeeded" in args and s["backup"]:
                    print("example-backup-29000000-x7k2q", end="")
            elif what == "pods":
                for pod in s["pods"]:
                    print("pod/" + pod)
    return 0


def main():
    tool = os.path.basename(sys.argv[0])
    with open(STATE + ".calls", "a") as f:
        f.write(" ".join([tool] + sys.argv[1:]) + "\n")
    if tool == "kubectl":
        sys.exit(kubectl(sys.argv[1:]))
    if tool == "docker" and sys.argv[1:2] == ["info"] and os.environ.get("FAKE_DOCKER_DOWN"):
        sys.exit(1)
    sys.exit(0)  # docker, kind, helm: every call succeeds


if __name__ == "__main__":
    main()
