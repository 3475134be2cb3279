#!/usr/bin/env python3
"""Generate a pilot benchmark config dir: S Kubernetes Services with R Pods each, Istio routing.

Default: 1000 services x 3 endpoints = 3000 endpoints in namespace `bench`.

  services.yaml-ish layout (one file per 100 services, like a GitOps repo would split them):
    k8s/services-000.yaml   Service svc-N (port 80 "http" -> targetPort 8080, selector app=svc-N)
                            + Pods svc-N-0..R-1 (labels app, version v1|v2; podIP)
    routing/svc-N.yaml      for every 10th service: DestinationRule (subsets v1, v2) and a
                            VirtualService with a 90/10 v1/v2 split
    gateway.yaml            Gateway bench-gateway (port 80, HTTP) + a VirtualService binding it
                            to svc-0

Pod IPs: pod index k = N*R + r gets 10.10.0.1 + k, so a simulated client with
`mizzen-xds-load --ip-base 10.10.0.1` (client i = 10.10.0.1 + i) is pod k=i: a known workload.

--change-dir DIR also writes the two versions of routing/svc-0.yaml used by the change test:
DIR/svc-0-90-10.yaml (as generated) and DIR/svc-0-80-20.yaml (weights edited).
"""
import argparse
import ipaddress
import os


def pod_ip(k):
    return str(ipaddress.IPv4Address("10.10.0.1") + k)


def service_docs(ns, n, replicas):
    name = f"svc-{n}"
    docs = [f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app: {name}
spec:
  type: ClusterIP
  clusterIP: {ipaddress.IPv4Address("10.96.0.10") + n}
  selector:
    app: {name}
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
"""]
    for r in range(replicas):
        k = n * replicas + r
        version = "v2" if r == replicas - 1 and replicas > 1 else "v1"
        ip = pod_ip(k)
        docs.append(f"""apiVersion: v1
kind: Pod
metadata:
  name: {name}-{r}
  namespace: {ns}
  labels:
    app: {name}
    version: {version}
    security.istio.io/tlsMode: istio
  annotations:
    sidecar.istio.io/status: '{{"containers":["istio-proxy"]}}'
spec:
  serviceAccountName: {name}
  nodeName: node-{k % 50}
  containers:
  - name: app
    image: registry.example.com/bench/{name}:1.0
    ports:
    - name: http
      containerPort: 8080
      protocol: TCP
  - name: istio-proxy
    image: docker.io/istio/proxyv2:1.24.0
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
""")
    return docs


def routing_doc(ns, n, v1, v2):
    name = f"svc-{n}"
    return f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: {ns}
spec:
  host: {name}.{ns}.svc.cluster.local
  trafficPolicy:
    connectionPool:
      http:
        http1MaxPendingRequests: 1024
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: {ns}
spec:
  hosts:
  - {name}
  http:
  - route:
    - destination:
        host: {name}
        subset: v1
      weight: {v1}
    - destination:
        host: {name}
        subset: v2
      weight: {v2}
    timeout: 5s
    retries:
      attempts: 2
      perTryTimeout: 2s
      retryOn: 5xx,connect-failure
"""


GATEWAY = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bench-gateway
  namespace: {ns}
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench-ingress
  namespace: {ns}
spec:
  hosts:
  - "*"
  gateways:
  - bench-gateway
  http:
  - match:
    - uri:
        prefix: /svc-0
    route:
    - destination:
        host: svc-0.{ns}.svc.cluster.local
        port:
          number: 80
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="config dir to write (created; existing generated files are replaced)")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=3, help="pods (endpoints) per service")
    ap.add_argument("--namespace", default="bench")
    ap.add_argument("--routing-every", type=int, default=10, help="DR+VS for every Nth service")
    ap.add_argument("--per-file", type=int, default=100, help="services per k8s/*.yaml file")
    ap.add_argument("--change-dir", help="also write svc-0-90-10.yaml and svc-0-80-20.yaml here")
    a = ap.parse_args()
    ns = a.namespace
    os.makedirs(os.path.join(a.out, "k8s"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "routing"), exist_ok=True)
    with open(os.path.join(a.out, "namespace.yaml"), "w") as f:
        f.write(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    istio-injection: enabled\n")
    for start in range(0, a.services, a.per_file):
        docs = []
        for n in range(start, min(start + a.per_file, a.services)):
            docs.extend(service_docs(ns, n, a.replicas))
        with open(os.path.join(a.out, "k8s", f"services-{start // a.per_file:03d}.yaml"), "w") as f:
            f.write("---\n".join(docs))
    routed = 0
    for n in range(0, a.services, a.routing_every):
        with open(os.path.join(a.out, "routing", f"svc-{n}.yaml"), "w") as f:
            f.write(routing_doc(ns, n, 90, 10))
        routed += 1
    with open(os.path.join(a.out, "gateway.yaml"), "w") as f:
        f.write(GATEWAY.format(ns=ns))
    if a.change_dir:
        os.makedirs(a.change_dir, exist_ok=True)
        with open(os.path.join(a.change_dir, "svc-0-90-10.yaml"), "w") as f:
            f.write(routing_doc(ns, 0, 90, 10))
        with open(os.path.join(a.change_dir, "svc-0-80-20.yaml"), "w") as f:
            f.write(routing_doc(ns, 0, 80, 20))
    print(f"{a.out}: {a.services} services, {a.services * a.replicas} endpoints, "
          f"{routed} DestinationRules + VirtualServices, 1 Gateway")


if __name__ == "__main__":
    main()
