#!/usr/bin/env python3
"""Prints the Services and EndpointSlices of one namespace as tables.

Reads the admin kubeconfig written by scripts/testenv (bearer token and CA) and talks
to the apiserver with the standard library only, so the demo needs no kubectl.
"""
import base64
import json
import ssl
import sys
import tempfile
import urllib.request


def load_kubeconfig(path):
    server = token = ca = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("server:"):
                server = line.split(":", 1)[1].strip()
            elif line.startswith("token:"):
                token = line.split(":", 1)[1].strip()
            elif line.startswith("certificate-authority-data:"):
                ca = base64.b64decode(line.split(":", 1)[1].strip())
            elif line.startswith("certificate-authority:"):
                with open(line.split(":", 1)[1].strip(), "rb") as c:
                    ca = c.read()
    return server, token, ca


def get(server, token, ctx, path):
    req = urllib.request.Request(server + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.load(resp)


def table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*headers))
    for row in rows:
        print(fmt.format(*[str(x) for x in row]))


def main():
    kubeconfig, namespace = sys.argv[1], sys.argv[2]
    selector = sys.argv[3] if len(sys.argv) > 3 else "app.kubernetes.io/managed-by=registry-connector"
    server, token, ca = load_kubeconfig(kubeconfig)
    with tempfile.NamedTemporaryFile() as caf:
        caf.write(ca)
        caf.flush()
        ctx = ssl.create_default_context(cafile=caf.name)
        q = "?labelSelector=" + urllib.request.quote(selector)
        services = get(server, token, ctx, f"/api/v1/namespaces/{namespace}/services{q}")["items"]
        slices = get(server, token, ctx, f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices{q}")["items"]

    rows = []
    for s in sorted(services, key=lambda s: s["metadata"]["name"]):
        spec = s["spec"]
        ports = ",".join(f'{p.get("name")}:{p["port"]}/{p.get("appProtocol", "-")}' for p in spec.get("ports", []))
        kind = "Headless" if spec.get("clusterIP") == "None" else spec.get("type")
        origin = s["metadata"].get("annotations", {}).get("flomesh.io/cloud-service-inherited-from", "")
        rows.append((s["metadata"]["name"], kind, spec.get("externalName") or spec.get("clusterIP", ""), ports, origin))
    print(f"Services in namespace {namespace}:")
    table(rows, ["NAME", "TYPE", "CLUSTER-IP/TARGET", "PORTS", "REGISTRY NAME"])
    print()

    rows = []
    for sl in sorted(slices, key=lambda s: s["metadata"]["name"]):
        eps = sl.get("endpoints") or []
        ready = [e["addresses"][0] for e in eps if (e.get("conditions") or {}).get("ready")]
        not_ready = [e["addresses"][0] for e in eps if not (e.get("conditions") or {}).get("ready")]
        ports = ",".join(str(p.get("port")) for p in sl.get("ports") or [])
        shown = " ".join(ready[:4]) + (" ..." if len(ready) > 4 else "")
        rows.append((sl["metadata"]["name"], sl["metadata"]["labels"].get("kubernetes.io/service-name"),
                     sl["addressType"], ports, shown or "-", ",".join(not_ready) or "-"))
    print(f"EndpointSlices in namespace {namespace}:")
    table(rows, ["NAME", "SERVICE", "FAMILY", "PORTS", "READY", "NOT READY"])

    # Nacos's group and clusters, kept in annotations (only services from Nacos have them).
    nacos = "nacos.connector.flomesh.io/"
    rows = []
    for s in sorted(services, key=lambda s: s["metadata"]["name"]):
        a = s["metadata"].get("annotations", {})
        if nacos + "group" in a:
            rows.append((s["metadata"]["name"], a[nacos + "group"], a.get(nacos + "service", ""),
                         a.get(nacos + "clusters", "") or "-"))
    if rows:
        print()
        print("Nacos annotations (nacos.connector.flomesh.io/...):")
        table(rows, ["SERVICE", "GROUP", "NACOS SERVICE", "CLUSTERS"])

    # ZooKeeper's Dubbo interface, version, group and applications, or Curator service.
    zk = "zookeeper.connector.flomesh.io/"
    rows = []
    for s in sorted(services, key=lambda s: s["metadata"]["name"]):
        a = s["metadata"].get("annotations", {})
        if any(k.startswith(zk) for k in a):
            rows.append((s["metadata"]["name"], a.get(zk + "interface") or a.get(zk + "service") or "-",
                         a.get(zk + "version", "-"), a.get(zk + "group", "-"), a.get(zk + "application", "-")))
    if rows:
        print()
        print("ZooKeeper annotations (zookeeper.connector.flomesh.io/...):")
        table(rows, ["SERVICE", "INTERFACE / CURATOR NAME", "VERSION", "GROUP", "APPLICATION"])


if __name__ == "__main__":
    main()
