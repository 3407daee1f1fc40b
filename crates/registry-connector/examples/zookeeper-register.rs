//! Registers nodes in ZooKeeper the way Dubbo and Curator clients do, for `scripts/demo
//! zookeeper`: each `PATH=DATA` argument becomes an ephemeral node of this process's
//! session (its parents persistent), then it prints `ready N` and holds the session until
//! its standard input closes, when the nodes vanish as a provider's do when it exits.
//!
//! ```text
//! cargo run -p registry-connector --example zookeeper-register -- 127.0.0.1:2181 \
//!     '/services/orders/1={"address":"192.0.2.10","port":8080}' < /dev/tty
//! ```

use std::time::Duration;

use anyhow::{bail, Context, Result};
use zookeeper_client::{Acls, Client, CreateMode};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(connect) = args.next() else {
        bail!("usage: zookeeper-register CONNECT PATH=DATA...");
    };
    let zk = Client::connector()
        .with_session_timeout(Duration::from_secs(30))
        .connect(&connect)
        .await
        .with_context(|| format!("connecting to {connect}"))?;
    let mut n = 0;
    for spec in args {
        let (path, data) = spec.split_once('=').unwrap_or((&spec, ""));
        if let Some((parent, _)) = path.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
            match zk
                .mkdir(
                    parent,
                    &CreateMode::Persistent.with_acls(Acls::anyone_all()),
                )
                .await
            {
                Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => return Err(e).with_context(|| format!("creating {parent}")),
            }
        }
        zk.create(
            path,
            data.as_bytes(),
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await
        .with_context(|| format!("creating {path}"))?;
        n += 1;
    }
    println!("ready {n}");
    // Held until standard input closes (the session, and with it the nodes, go then).
    tokio::task::spawn_blocking(|| {
        use std::io::Read;
        std::io::stdin().read_to_end(&mut Vec::new())
    })
    .await??;
    Ok(())
}
