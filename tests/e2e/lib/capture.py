"""Istio's standard outbound REDIRECT capture rules, written by the tests themselves (not by
`mizzen iptables`), as ``istio-iptables -p 15001 -u 1337 -g 1337 -m REDIRECT -i '*' -b ''``
would install them: every outbound TCP connection goes to the proxy's 15001, except the
proxy's own (uid/gid 1337) and loopback destinations."""


def istio_outbound_redirect_rules(proxy_port: int = 15001, inbound_port: int = 15006,
                                  uid: int = 1337, gid: int = 1337) -> str:
    """iptables-restore input (nat table only)."""
    return f"""*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {proxy_port}
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound_port}
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --gid-owner {gid} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


def apply_in_netns(ns, rules: str) -> None:
    """Load rules with iptables-restore inside the namespace (other tables untouched)."""
    ns.exec(["iptables-restore", "--noflush"], input=rules)
