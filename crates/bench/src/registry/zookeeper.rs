//! ZooKeeper as the benchmark drives it: synthetic Dubbo providers, written as Dubbo's
//! ZooKeeper registry writes them, one ephemeral node of the harness's session per
//! instance, `<base>/<service>/providers/<URL-encoded provider URL>`, below a base path
//! of its own per data set (`/bench/<set>`: the connector's `--zookeeper-base-path`, its
//! selection). Readiness is the URL's `weight` (100, or 0: the connector publishes a
//! weight-0 provider not ready); since the URL is the node's name, a readiness change
//! renames the node, the old one deleted and the new one created in one `multi` as an
//! operator's tooling would. Deregistration deletes the node. The connector sees every
//! change through its persistent recursive watch, so the registry adds no delay of its
//! own beyond the event's delivery.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use zookeeper_client::{Acls, Client, CreateMode};

use crate::model::{Instance, Service, PORT};

/// Java's `URLEncoder`: everything but `[A-Za-z0-9.*_-]` is `%XX`.
const JAVA_URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'*')
    .remove(b'_')
    .remove(b'-');

/// The harness's session: long enough that a loaded machine never expires it.
const SESSION_TIMEOUT: Duration = Duration::from_secs(40);

/// (service, address) → the provider node's current path, per data set.
type Nodes = BTreeMap<String, BTreeMap<(String, String), String>>;

/// A ZooKeeper client restricted to what the benchmark does.
pub struct Zookeeper {
    /// `127.0.0.1:PORT`.
    addr: String,
    client: Client,
    sets: Mutex<Nodes>,
}

impl std::fmt::Debug for Zookeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zookeeper")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The base path of data set `set`.
fn base(set: &str) -> String {
    format!("/bench/{set}")
}

/// The provider node of `inst`, ready or not.
fn provider_path(svc: &Service, inst: &Instance, ready: bool) -> String {
    let weight = if ready { 100 } else { 0 };
    let url = format!(
        "dubbo://{}:{PORT}/{name}?application=bench&interface={name}&side=provider&weight={weight}",
        inst.address,
        name = svc.name
    );
    format!(
        "{}/{}/providers/{}",
        base(&svc.set),
        svc.name,
        utf8_percent_encode(&url, JAVA_URL_ENCODE)
    )
}

impl Zookeeper {
    /// Connects to the server at `addr` (`127.0.0.1:PORT`).
    pub async fn connect(addr: &str) -> Result<Self> {
        if !(addr.starts_with("127.") || addr.starts_with("localhost")) {
            bail!("the benchmark only talks to a ZooKeeper server on the loopback, not {addr}");
        }
        let client = Client::connector()
            .with_session_timeout(SESSION_TIMEOUT)
            .connect(addr)
            .await
            .with_context(|| format!("connecting to ZooKeeper at {addr}"))?;
        Ok(Self {
            addr: addr.to_string(),
            client,
            sets: Mutex::new(BTreeMap::new()),
        })
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// The connector's flags that make it read this server and only data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        vec![
            "--zookeeper-addr".into(),
            self.addr.clone(),
            "--zookeeper-layout".into(),
            "dubbo".into(),
            "--zookeeper-base-path".into(),
            base(set),
        ]
    }

    /// ZooKeeper-specific tuning of every connector: none.
    pub fn tuning_flags(&self) -> Vec<String> {
        Vec::new()
    }

    /// Creates `path` as an ephemeral node, its parents as persistent ones.
    async fn create(&self, path: &str) -> Result<()> {
        let node = CreateMode::Ephemeral.with_acls(Acls::anyone_all());
        match self.client.create(path, b"", &node).await {
            Ok(_) => Ok(()),
            Err(zookeeper_client::Error::NoNode) => {
                let (dir, _) = path.rsplit_once('/').context("a path with a parent")?;
                let dirs = CreateMode::Persistent.with_acls(Acls::anyone_all());
                self.client
                    .mkdir(dir, &dirs)
                    .await
                    .with_context(|| format!("mkdir {dir}"))?;
                self.client
                    .create(path, b"", &node)
                    .await
                    .with_context(|| format!("create {path}"))?;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("create {path}")),
        }
    }

    /// Registers one provider.
    pub async fn register(&self, svc: &Service, inst: &Instance) -> Result<()> {
        let path = provider_path(svc, inst, inst.ready);
        self.create(&path).await?;
        self.sets()
            .entry(svc.set.clone())
            .or_default()
            .insert((svc.name.clone(), inst.address.clone()), path);
        Ok(())
    }

    /// Deletes one provider's node.
    pub async fn deregister(&self, svc: &Service, inst: &Instance) -> Result<()> {
        let key = (svc.name.clone(), inst.address.clone());
        let Some(path) = self.sets().get_mut(&svc.set).and_then(|m| m.remove(&key)) else {
            return Ok(());
        };
        match self.client.delete(&path, None).await {
            Ok(()) | Err(zookeeper_client::Error::NoNode) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("delete {path}")),
        }
    }

    /// Renames the provider's node to its URL with weight 100 (ready) or 0, atomically.
    pub async fn set_ready(&self, svc: &Service, inst: &Instance, ready: bool) -> Result<()> {
        let key = (svc.name.clone(), inst.address.clone());
        let old = self
            .sets()
            .get(&svc.set)
            .and_then(|m| m.get(&key).cloned())
            .context("a provider the harness registered")?;
        let new = provider_path(svc, inst, ready);
        if new == old {
            return Ok(());
        }
        let mut multi = self.client.new_multi_writer();
        multi.add_delete(&old, None)?;
        multi.add_create(
            &new,
            b"",
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )?;
        multi
            .commit()
            .await
            .with_context(|| format!("renaming {old}"))?;
        self.sets()
            .entry(svc.set.clone())
            .or_default()
            .insert(key, new);
        Ok(())
    }

    /// Registers every instance of `services`, `concurrency` creates at a time (the
    /// directories of each service first).
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        let dirs = CreateMode::Persistent.with_acls(Acls::anyone_all());
        futures::stream::iter(services)
            .map(|s| {
                let dir = format!("{}/{}/providers", base(&s.set), s.name);
                let dirs = dirs.clone();
                async move {
                    self.client
                        .mkdir(&dir, &dirs)
                        .await
                        .with_context(|| format!("mkdir {dir}"))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let calls = services
            .iter()
            .flat_map(|s| s.instances.iter().map(move |i| (s, i)));
        futures::stream::iter(calls)
            .map(|(s, i)| self.register(s, i))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Providers ZooKeeper holds for `service` (in whichever data set has it).
    pub async fn instance_count(&self, service: &str) -> Result<usize> {
        let sets: Vec<String> = self
            .sets()
            .iter()
            .filter(|(_, nodes)| nodes.keys().any(|(s, _)| s == service))
            .map(|(set, _)| set.clone())
            .collect();
        let mut n = 0;
        for set in sets {
            let dir = format!("{}/{service}/providers", base(&set));
            match self.client.list_children(&dir).await {
                Ok(children) => n += children.len(),
                Err(zookeeper_client::Error::NoNode) => {}
                Err(e) => return Err(e).with_context(|| format!("listing {dir}")),
            }
        }
        Ok(n)
    }

    /// Deletes every provider of data set `set`, `concurrency` at a time.
    pub async fn remove_set(&self, set: &str, concurrency: usize) -> Result<usize> {
        let nodes = self.sets().remove(set).unwrap_or_default();
        let count = nodes.len();
        futures::stream::iter(nodes.into_values())
            .map(|path| async move {
                match self.client.delete(&path, None).await {
                    Ok(()) | Err(zookeeper_client::Error::NoNode) => Ok(()),
                    Err(e) => Err(anyhow::Error::new(e).context(format!("delete {path}"))),
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(count)
    }

    /// Removes every data set this run registered and did not remove yet.
    pub async fn cleanup(&self, concurrency: usize) -> Result<()> {
        let sets: Vec<String> = self.sets().keys().cloned().collect();
        for set in sets {
            self.remove_set(&set, concurrency).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_node_is_named_by_its_url_with_readiness_as_weight() {
        let svc = Service::new("s1-00000".into(), "bench-sync-1".into(), 1);
        let ready = provider_path(&svc, &svc.instances[0], true);
        assert!(
            ready.starts_with("/bench/bench-sync-1/s1-00000/providers/dubbo%3A%2F%2F192.0.2.1%3A8080%2Fs1-00000%3F"),
            "{ready}"
        );
        assert!(ready.ends_with("weight%3D100"), "{ready}");
        assert!(provider_path(&svc, &svc.instances[0], false).ends_with("weight%3D0"));
    }
}
