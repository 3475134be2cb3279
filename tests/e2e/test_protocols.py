"""Protocols through the gateway, once through Envoy 1.40 and once through the native Mizzen
proxy, with the same assertions unless a line says why they differ: WebSocket, streamed
request and response bodies, ``Expect: 100-continue``, header case, h2c downstream
(h2load), an HTTP/2 upstream cluster, gRPC (unary, server streaming, trailers, status,
fault abort with a gRPC status, local replies as gRPC).

The router mesh of test_routing.py (lib/router.py) plus the backends of lib/protocols.py,
configured by ``configs/protocols/protocols.yaml.tmpl``.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import uuid

import pytest

from backend import port_free_on_all
from lib.procs import free_port, wait_until
from lib.protocols import (MIXED_CASE_REPLY, GrpcEchoBackend, H2Backend, RawHttpBackend, WsEchoBackend,
                           http_exchange)
from lib.router import CONFIGS, PROXY_KINDS, RouterMesh, render, router_mesh, start_proxy, wait_acked
from lib.traffic import Gateway, echo

RAW_IP, WS_IP, GRPC_IP, H2_IP = "127.0.0.17", "127.0.0.18", "127.0.0.19", "127.0.0.20"


@pytest.fixture(scope="module", params=PROXY_KINDS)
def mesh(request, mizzen_bin, envoy_bin, tmp_path_factory):
    kind = request.param
    workdir = tmp_path_factory.mktemp(f"protocols-{kind}")
    started = []
    try:
        raw = RawHttpBackend("raw", RAW_IP).start()
        started.append(raw)
        ws = WsEchoBackend("ws", WS_IP).start()
        started.append(ws)
        grpc_be = GrpcEchoBackend("grpc", GRPC_IP, port_free_on_all([GRPC_IP])).start()
        started.append(grpc_be)
        h2_be = H2Backend("h2", H2_IP).start()
        started.append(h2_be)
        case_port = free_port("0.0.0.0")
        values = {"CASE_GATEWAY_PORT": case_port, "RAW_IP": RAW_IP, "RAW_PORT": raw.port, "CLOSED_PORT": port_free_on_all([RAW_IP]), "WS_IP": WS_IP, "WS_PORT": ws.port,
                  "GRPC_IP": GRPC_IP, "GRPC_PORT": grpc_be.port, "H2_IP": H2_IP, "H2_PORT": h2_be.port}
        extra = {"protocols.yaml": render(CONFIGS / "protocols" / "protocols.yaml.tmpl", values)}
        with router_mesh(kind, "delta", mizzen_bin, envoy_bin, workdir, extra_files=extra) as m:
            m.raw, m.ws, m.grpc, m.h2 = raw, ws, grpc_be, h2_be
            m.case_gateway_port = case_port
            m.envoy_bin = envoy_bin
            m.workdir = workdir
            wait_until(lambda: m.gw.get("raw.example.com", "/", timeout=2).headers.get("x-backend") == "raw", 15,
                       what="raw.example.com routed", proc=m.proxy.proc)
            yield m
    finally:
        for s in reversed(started):
            s.stop()


# ------------------------------------------------------------------------------ HTTP/1.1
def _upgrade_types(mesh: RouterMesh) -> list[str]:
    """``upgrade_type`` of every upgrade config in the gateway listener's config dump."""
    out: list[str] = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "upgrade_configs":
                    out.extend(u.get("upgrade_type") for u in v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    for c in mesh.proxy.config_dump()["configs"]:
        if c["@type"].endswith("ListenersConfigDump"):
            walk([dl for dl in c.get("dynamic_listeners", []) if dl["name"] == f"0.0.0.0_{mesh.gateway_port}"])
    return out


def test_websocket_echo(mesh: RouterMesh):
    from websockets.sync.client import connect

    # The pilot allows WebSocket on the gateway's HTTP connection manager, as Istio does
    # (both proxies refuse upgrades they are not configured for, test_routing.py checks that).
    # Only Envoy's dump shows the HCM; the native proxy's lists names and addresses.
    if mesh.proxy_kind == "envoy":
        assert "websocket" in _upgrade_types(mesh)

    sock = socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=10)
    with connect("ws://ws.example.com/echo", sock=sock, open_timeout=10, close_timeout=5) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=10) == f"ws:hello {i}"
        blob = bytes(range(256)) * 64
        ws.send(blob)
        assert ws.recv(timeout=10) == blob


def test_upload_streams_before_the_body_ends(mesh: RouterMesh):
    """A chunked upload larger than the retry buffer: the backend has the request while the
    client still holds most of the body (a proxy that buffers it whole would wait for the
    end), and every byte arrives."""
    tag = uuid.uuid4().hex
    chunk = b"x" * 65536
    total = 0
    with socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=10) as s:
        s.sendall(f"POST /upload/{tag} HTTP/1.1\r\nHost: raw.example.com\r\n"
                  "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        total += len(chunk)
        wait_until(lambda: tag in mesh.raw.started, 10, interval=0.05,
                   what="the backend got the upload's headers before its body ended", proc=mesh.proxy.proc)
        for _ in range(40):  # 2.5 MiB more: past the 1 MiB retry buffer
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            total += len(chunk)
        s.sendall(b"0\r\n\r\n")
        f = s.makefile("rb")
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        length = None
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        assert length is not None
        info = json.loads(f.read(length))
    assert info["bytes"] == total == 41 * 65536, info["bytes"]


def test_streamed_response_arrives_before_the_backend_finishes(mesh: RouterMesh):
    tag = uuid.uuid4().hex
    conn = http.client.HTTPConnection("127.0.0.1", mesh.gateway_port, timeout=5)
    try:
        conn.request("GET", f"/stream/{tag}", headers={"Host": "raw.example.com"})
        r = conn.getresponse()
        assert r.status == 200
        # The backend holds its second chunk until we release it (at most 10 s): only a
        # proxy that streams lets us read the first one within our 5 s timeout.
        assert r.read(6) == b"first\n"
        mesh.raw.release(tag)
        assert r.read() == b"second\n"
    finally:
        mesh.raw.release(tag)
        conn.close()


def test_retries_resend_a_streamed_body(mesh: RouterMesh):
    """The body streams upstream, and a copy within the retry buffer is what each retry
    sends again: 4 attempts (retries: attempts 3) each with all the bytes. A body beyond the
    buffer (1 MiB in Envoy and in the native proxy) streams once and is not retried."""
    tag = uuid.uuid4().hex
    body = bytes(range(256)) * 400  # 100 KiB
    r = mesh.gw.session.post(f"http://127.0.0.1:{mesh.gateway_port}/status/503/{tag}", data=body, timeout=20,
                             headers={"Host": "retry.example.com"})
    assert r.status_code == 503
    assert echo(r)["headers"]["content-length"] == str(len(body))
    assert mesh.b["web-v1"].count(f"/status/503/{tag}") == 4, "1 try + 3 retries, each with the body"

    big = b"y" * (2 << 20)
    r = mesh.gw.session.post(f"http://127.0.0.1:{mesh.gateway_port}/status/503/big-{tag}", data=big, timeout=20,
                             headers={"Host": "retry.example.com"})
    assert r.status_code == 503
    assert mesh.b["web-v1"].count(f"/status/503/big-{tag}") == 1, "over the retry buffer: no retry"


def test_expect_100_continue(mesh: RouterMesh):
    """The proxy answers `100 Continue` itself (the client waits for it before sending the
    body) and does not pass the expectation upstream, as Envoy does by default."""
    tag = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=10) as s:
        s.sendall(f"POST /expect/{tag} HTTP/1.1\r\nHost: raw.example.com\r\nContent-Length: 5\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        f = s.makefile("rb")
        interim = f.readline()
        assert interim.startswith(b"HTTP/1.1 100"), interim
        assert f.readline() == b"\r\n"
        s.sendall(b"hello")
        final = f.readline()
        assert final.startswith(b"HTTP/1.1 200"), final
    got = [r for r in mesh.raw.requests if r["path"] == f"/expect/{tag}"]
    assert len(got) == 1 and got[0]["bytes"] == 5, got
    assert "expect" not in got[0]["headers"], got[0]["headers"]


def _case_exchange(mesh: RouterMesh, port: int) -> tuple[list[str], list[str]]:
    """One HTTP/1.1 request with ``X-Custom-Header`` to raw.example.com through the gateway
    on ``port``: the header names the backend got, and those of the reply the client got."""
    tag = uuid.uuid4().hex
    raw = http_exchange(port, f"GET /case/{tag} HTTP/1.1\r\nHost: raw.example.com\r\n"
                              f"X-Custom-Header: a\r\nConnection: close\r\n\r\n".encode())
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    got = [r for r in mesh.raw.requests if r["path"] == f"/case/{tag}"]
    assert len(got) == 1, got
    return got[0]["header_names"], [ln.split(":", 1)[0] for ln in head.split("\r\n")[1:]]


def test_header_case_on_the_wire(mesh: RouterMesh, mizzen_bin):
    """HTTP/1 header names, both ways. By default both proxies lowercase them (Envoy 1.40
    as Istio configures it: no header_key_format). A gateway whose pod ProxyConfig says
    proxyHeaders.preserveHttp1HeaderCase (the injector's PROXY_CONFIG, which the agent puts
    in the node metadata) keeps them as written: the pilot sets Envoy's preserve_case
    formatter on its HCM and its HTTP clusters, which Envoy takes without a NACK."""
    to_backend, to_client = _case_exchange(mesh, mesh.gateway_port)
    assert "x-custom-header" in to_backend and "X-Custom-Header" not in to_backend, to_backend
    assert MIXED_CASE_REPLY.lower() in to_client and MIXED_CASE_REPLY not in to_client, to_client

    case_gw = start_proxy(mesh.proxy_kind, mizzen_bin, mesh.envoy_bin, "router", mesh.pilot.xds_address,
                          pod_name="case-gw-0", namespace="istio-system", ip="127.0.0.101",
                          labels={"istio": "casegateway"}, workdir=mesh.workdir,
                          env={"PROXY_CONFIG": json.dumps({"proxyHeaders": {"preserveHttp1HeaderCase": True}})})
    gw = Gateway(mesh.case_gateway_port)
    try:
        wait_until(lambda: gw.get("raw.example.com", "/", timeout=2).headers.get("x-backend") == "raw",
                   15, what="raw.example.com routed by the case gateway", proc=case_gw.proc)
        wait_acked(mesh.pilot, case_gw.node_id)
        to_backend, to_client = _case_exchange(mesh, mesh.case_gateway_port)
        assert "X-Custom-Header" in to_backend, to_backend
        assert MIXED_CASE_REPLY in to_client, to_client
        if mesh.proxy_kind == "envoy":
            case_gw.assert_no_rejected_updates()
        else:
            assert case_gw.rejected() == {}
    finally:
        gw.close()
        case_gw.stop()


# ------------------------------------------------------------------------------ HTTP/2, gRPC
def test_h2c_downstream_with_h2load(mesh: RouterMesh):
    cp = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "10", "-H", ":authority: split.example.com",
                         f"http://127.0.0.1:{mesh.gateway_port}/h2load"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored" in cp.stdout, cp.stdout
    assert "status codes: 400 2xx" in cp.stdout, cp.stdout
    assert "Application protocol: h2c" in cp.stdout, cp.stdout


@pytest.mark.parametrize("host", ["h2.example.com", "h2up.example.com"])
def test_http2_upstream_carries_the_authority(mesh: RouterMesh, host):
    """A port named http2, and a port named http with DestinationRule h2UpgradePolicy
    UPGRADE: the cluster speaks HTTP/2 to a server that only speaks h2c, with the request's
    host as :authority, over few multiplexed connections."""
    before = len(mesh.h2.seen)
    for i in range(20):
        r = mesh.gw.get(host, f"/h2/{i}")
        assert r.status_code == 200, (r.status_code, r.text[:200])
        assert r.json()["authority"] == host, r.json()
    seen = mesh.h2.seen[before:]
    assert len(seen) == 20
    assert {a for a, _ in seen} == {host}
    assert len({c for _, c in seen}) <= 4, seen


def test_http2_upstream_reconnects_after_the_server_closes(mesh: RouterMesh):
    for i in range(3):
        assert mesh.gw.get("h2.example.com", f"/before/{i}").status_code == 200
    assert mesh.h2.drop_connections() >= 1
    # The proxy opens a new connection; a request that raced the close is reset and retried
    # (the route retries on reset), so none fails.
    codes = [mesh.gw.get("h2.example.com", f"/after/{i}").status_code for i in range(5)]
    assert codes == [200] * 5, codes


def _channel(mesh: RouterMesh, authority: str):
    import grpc
    return grpc.insecure_channel(f"127.0.0.1:{mesh.gateway_port}",
                                 options=[("grpc.default_authority", authority)])


def test_grpc_unary_and_server_streaming(mesh: RouterMesh):
    import grpc
    with _channel(mesh, "grpc.example.com") as ch:
        resp, call = ch.unary_unary("/mizzen.Echo/Unary").with_call(b"hi", timeout=10)
        assert resp == b"grpc:hi"
        assert call.code() == grpc.StatusCode.OK
        assert ("x-trailer", "unary") in tuple(call.trailing_metadata())

        stream = ch.unary_stream("/mizzen.Echo/ServerStream")(b"5", timeout=10)
        assert [m for m in stream] == [b"0", b"1", b"2", b"3", b"4"]
        assert stream.code() == grpc.StatusCode.OK
        assert ("x-trailer", "stream") in tuple(stream.trailing_metadata())

        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/mizzen.Echo/Unary")(b"fail", timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details() == "told to fail"
        assert ("x-trailer", "failed") in tuple(e.value.trailing_metadata())


def test_grpc_fault_abort_answers_the_grpc_status(mesh: RouterMesh):
    import grpc
    calls = len(mesh.grpc.calls)
    with _channel(mesh, "grpc.example.com") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/mizzen.Echo/Aborted")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
    assert len(mesh.grpc.calls) == calls, "an aborted call must not reach the server"


def test_grpc_local_replies_are_grpc(mesh: RouterMesh):
    """No healthy upstream answers HTTP 200 with grpc-status 14 (UNAVAILABLE), no route
    grpc-status 12 (UNIMPLEMENTED, Envoy's mapping of 404), both as trailers-only responses."""
    import grpc

    with _channel(mesh, "grpc-down.example.com") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/mizzen.Echo/Unary")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
    # grpc-message carries the local reply's text; a plain HTTP 503 would read "Received http2
    # header with status: 503" here.
    assert e.value.details() == "no healthy upstream", e.value.details()
    with _channel(mesh, "nowhere.example.org") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/mizzen.Echo/Unary")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, (e.value.code(), e.value.details())
    assert "http2 header with status" not in (e.value.details() or ""), e.value.details()


def test_upstream_failures_answer_like_envoy(mesh: RouterMesh):
    """A cluster without endpoints: 503 `no healthy upstream` (UH). An endpoint that
    refuses: 503 after Istio's default retry (connect-failure), in Envoy's words and flags."""
    tag = uuid.uuid4().hex
    r = mesh.gw.get("grpc-down.example.com", f"/uh/{tag}")
    assert (r.status_code, r.text) == (503, "no healthy upstream")
    r = mesh.gw.get("refused.example.com", f"/uf/{tag}")
    assert r.status_code == 503
    assert r.text == ("upstream connect error or disconnect/reset before headers. retried and the latest "
                      "reset reason: remote connection failure"), r.text
    flags = mesh.response_flags([f"/uh/{tag}", f"/uf/{tag}"])
    assert (flags[f"/uh/{tag}"], flags[f"/uf/{tag}"]) == ("UH", "URX,UF"), flags
