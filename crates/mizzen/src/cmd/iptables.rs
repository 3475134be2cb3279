//! `mizzen iptables`.

#[derive(clap::Args)]
pub struct IptablesArgs {}

pub fn run(_args: IptablesArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen iptables is not implemented yet")
}
