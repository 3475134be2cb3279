//! mizzen-capture: traffic capture rules (istio-iptables), iptables and nftables backends.
