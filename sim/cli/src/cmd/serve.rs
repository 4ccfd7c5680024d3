//! `otarig serve`: the firmware server over a release store directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use otarig_server::release_store::ReleaseStore;
use otarig_server::server::Server;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    store: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let store = Arc::new(ReleaseStore::open(&a.store)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let server = Server::start(store.clone(), a.listen).await?;
        println!(
            "serving {} on {} (Ctrl-C stops)",
            store.root().display(),
            server.url()
        );
        tokio::signal::ctrl_c().await?;
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
