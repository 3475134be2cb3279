//! `mizzen sample_app`.

#[derive(clap::Args)]
pub struct SampleAppArgs {}

pub fn run(_args: SampleAppArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen sample_app is not implemented yet")
}
