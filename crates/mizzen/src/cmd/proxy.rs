//! `mizzen proxy`.

#[derive(clap::Args)]
pub struct ProxyArgs {}

pub fn run(_args: ProxyArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen proxy is not implemented yet")
}
