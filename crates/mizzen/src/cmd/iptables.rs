//! `mizzen iptables`: set up (or print, or remove) the sidecar's traffic capture, flag- and
//! output-compatible with Istio's `istio-iptables`. Rule generation and application live in
//! `mizzen-capture`; this file only wires the CLI to it and reports errors.

use mizzen_capture::flags::ProcessEnv;
use mizzen_capture::{
    generate, iptables, nftables, Config, Family, Flags, InterceptionMode, Ruleset,
};

#[derive(clap::Args)]
pub struct IptablesArgs {
    #[command(flatten)]
    pub flags: Flags,
}

/// Exit code for invalid flags (nothing was changed).
const EXIT_BAD_FLAGS: u8 = 2;

pub fn run(args: IptablesArgs) -> anyhow::Result<u8> {
    let flags = args.flags;
    let cfg = match flags.to_config(&ProcessEnv, &|| {
        std::fs::read_to_string("/etc/resolv.conf").ok()
    }) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("mizzen iptables: {e}");
            return Ok(EXIT_BAD_FLAGS);
        }
    };
    if cfg.redirect_dns
        && !cfg.capture_all_dns
        && cfg.dns_servers_v4.is_empty()
        && cfg.dns_servers_v6.is_empty()
    {
        eprintln!("mizzen iptables: --redirect-dns is set, but --capture-all-dns is not and no DNS servers were found: DNS capture disabled");
    }
    let desired = if flags.cleanup_only {
        Ruleset::default()
    } else {
        generate(&cfg)
    };

    if flags.native_nftables {
        let script = if flags.cleanup_only {
            nftables::cleanup_script()
        } else {
            nftables::script(&desired)?
        };
        if flags.dry_run {
            print!("{script}");
            return Ok(0);
        }
        nftables::run_script(&script)?;
    } else {
        if flags.dry_run {
            if !flags.cleanup_only {
                print!("{}", desired.to_restore(Family::V4));
                if cfg.enable_ipv6 {
                    println!("# ip6tables");
                    print!("{}", desired.to_restore(Family::V6));
                }
            }
            return Ok(0);
        }
        let candidates = cleanup_candidates(&cfg);
        iptables::apply_family(&desired, &candidates, Family::V4)?;
        // On cleanup, also clear IPv6 leftovers when ip6tables exists, whatever the flags.
        if cfg.enable_ipv6 || (flags.cleanup_only && iptables::available(Family::V6)) {
            iptables::apply_family(&desired, &candidates, Family::V6)?;
        }
    }

    if flags.cleanup_only {
        iptables::cleanup_tproxy_routes(cfg.inbound_tproxy_mark, cfg.inbound_tproxy_route_table);
    } else if cfg.mode == InterceptionMode::Tproxy {
        iptables::configure_tproxy_routes(
            cfg.inbound_tproxy_mark,
            cfg.inbound_tproxy_route_table,
            cfg.enable_ipv6,
        )?;
    }
    Ok(0)
}

/// Every built-in-chain rule a previous run with these flags may have added, in either
/// interception mode and with IPv6 on: cleanup removes whichever of them is present.
fn cleanup_candidates(cfg: &Config) -> Ruleset {
    let mut all = Ruleset::default();
    for mode in [InterceptionMode::Redirect, InterceptionMode::Tproxy] {
        let c = Config {
            mode,
            enable_ipv6: true,
            ..cfg.clone()
        };
        let r = generate(&c);
        all.v4.extend(r.v4);
        all.v6.extend(r.v6);
    }
    all
}
