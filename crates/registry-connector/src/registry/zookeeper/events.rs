//! What one node event of the persistent recursive watch does to the [`Mirror`]: pure,
//! from the event's kind and path (and, for a Curator instance created or changed, the
//! data read for it) to the services it touched. The watch loop does the I/O around it.
//!
//! A persistent *recursive* watch reports `NodeCreated`, `NodeDeleted` and
//! `NodeDataChanged` for every node below the base path, never `NodeChildrenChanged`.
//! What each means:
//! - Dubbo: a node created below `<interface>/providers` is a provider (its name is its
//!   URL: no read), a deleted one is gone; data changes are ignored (a provider's data is
//!   not read). `<interface>/providers` or `<interface>` deleted: every provider of the
//!   interface is gone (ZooKeeper deletes children first, so this is a safety net).
//!   Everything else (`consumers`, `configurators`, `routers`, Dubbo 3's `mapping`,
//!   `config` and `metadata` trees) is ignored.
//! - Curator: `<name>/<id>` created or changed is read and (re)built, deleted is gone;
//!   `<name>` deleted: the whole service is gone.
//! - The base path deleted: everything is gone.

use super::api::{self, Below, PROVIDERS};
use super::config::Layout;
use super::mirror::Mirror;
use super::select::Selection;

/// The kind of a node event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Deleted,
    DataChanged,
}

/// What applying one event did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Services to rebuild and publish.
    pub touched: Vec<Box<str>>,
    /// The directory whose reported problems may have changed.
    pub dir: Option<String>,
}

/// Whether an event at `path` needs the node's data before it can be applied: a Curator
/// instance created or changed.
pub fn needs_data(layout: Layout, base: &str, change: Change, path: &str) -> bool {
    layout == Layout::Curator
        && change != Change::Deleted
        && matches!(api::below(base, path), Below::Two(..))
}

/// Applies one event at `path` to `mirror`. `data` is what [`needs_data`] asked for:
/// `Some(Some(bytes))` read, `Some(None)` the node was gone again when read, `None` not
/// read (then the event is left unapplied; a lost connection brings a complete read).
pub fn apply(
    mirror: &mut Mirror,
    selection: &Selection,
    layout: Layout,
    base: &str,
    change: Change,
    path: &str,
    data: Option<Option<&[u8]>>,
) -> Applied {
    let deleted = change == Change::Deleted;
    let below = api::below(base, path);
    if deleted && below == Below::Base {
        let dirs: Vec<String> = mirror.dirs().map(str::to_string).collect();
        let mut touched: Vec<Box<str>> = dirs.iter().flat_map(|d| mirror.remove_dir(d)).collect();
        touched.sort();
        touched.dedup();
        return Applied { touched, dir: None };
    }
    let applied = |touched: Vec<Box<str>>, dir: &str| Applied {
        touched,
        dir: Some(dir.to_string()),
    };
    match (layout, below) {
        (_, Below::One(dir)) if deleted => applied(mirror.remove_dir(dir), dir),
        (Layout::Dubbo, Below::Two(iface, PROVIDERS)) if deleted => {
            applied(mirror.remove_dir(iface), iface)
        }
        (Layout::Dubbo, Below::Three(iface, PROVIDERS, node)) => match change {
            Change::Created => {
                let entry = selection.dubbo_entry(iface, node);
                applied(mirror.set(iface, node, entry), iface)
            }
            Change::Deleted => applied(mirror.remove(iface, node), iface),
            Change::DataChanged => Applied::default(),
        },
        (Layout::Curator, Below::Two(name, id)) => match (change, data) {
            (Change::Deleted, _) | (_, Some(None)) => applied(mirror.remove(name, id), name),
            (_, Some(Some(bytes))) => {
                let entry = selection.curator_entry(name, bytes);
                applied(mirror.set(name, id, entry), name)
            }
            (_, None) => Applied::default(),
        },
        _ => Applied::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/dubbo";

    fn encode(url: &str) -> String {
        percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn provider(host: &str) -> String {
        encode(&format!(
            "dubbo://{host}:20880/com.example.A?application=shop&side=provider"
        ))
    }

    fn dubbo(m: &mut Mirror, change: Change, path: &str) -> Vec<String> {
        let s = Selection::default();
        apply(m, &s, Layout::Dubbo, BASE, change, path, None)
            .touched
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn dubbo_providers_come_and_go_by_path_alone() {
        let mut m = Mirror::default();
        let p1 = format!("/dubbo/com.example.A/providers/{}", provider("192.0.2.1"));
        let p2 = format!("/dubbo/com.example.A/providers/{}", provider("192.0.2.2"));
        assert!(!needs_data(Layout::Dubbo, BASE, Change::Created, &p1));
        assert_eq!(dubbo(&mut m, Change::Created, &p1), ["com.example.A"]);
        assert_eq!(dubbo(&mut m, Change::Created, &p2), ["com.example.A"]);
        assert!(
            dubbo(&mut m, Change::DataChanged, &p1).is_empty(),
            "data is not read"
        );
        assert_eq!(dubbo(&mut m, Change::Deleted, &p1), ["com.example.A"]);
        assert_eq!(m.len(), 1);
        // What Dubbo writes beside the providers touches nothing.
        for path in [
            "/dubbo/com.example.A/consumers/x",
            "/dubbo/com.example.A/configurators/x",
            "/dubbo/com.example.A/routers/x",
            "/dubbo/mapping/com.example.A",
            "/dubbo/metadata/com.example.A/1.0.0/provider/shop",
            "/dubbo/config/dubbo",
            "/elsewhere/com.example.A/providers/x",
        ] {
            assert!(dubbo(&mut m, Change::Created, path).is_empty(), "{path}");
        }
        assert_eq!(
            dubbo(&mut m, Change::Deleted, "/dubbo/com.example.A/providers"),
            ["com.example.A"]
        );
        assert!(m.is_empty());
    }

    #[test]
    fn deleting_the_base_path_or_a_directory_removes_what_it_held() {
        let mut m = Mirror::default();
        for (iface, host) in [
            ("com.example.A", "192.0.2.1"),
            ("com.example.B", "192.0.2.2"),
        ] {
            let node = encode(&format!(
                "dubbo://{host}:20880/{iface}?application=shop&side=provider"
            ));
            dubbo(
                &mut m,
                Change::Created,
                &format!("/dubbo/{iface}/providers/{node}"),
            );
        }
        assert_eq!(
            dubbo(&mut m, Change::Deleted, "/dubbo/com.example.A"),
            ["com.example.A"]
        );
        assert_eq!(dubbo(&mut m, Change::Deleted, "/dubbo"), ["com.example.B"]);
        assert!(m.is_empty());
    }

    #[test]
    fn curator_instances_are_read_then_applied() {
        let base = "/services";
        let s = Selection::default();
        let mut m = Mirror::default();
        let path = "/services/orders/1";
        assert!(needs_data(Layout::Curator, base, Change::Created, path));
        assert!(needs_data(Layout::Curator, base, Change::DataChanged, path));
        assert!(!needs_data(Layout::Curator, base, Change::Deleted, path));
        assert!(!needs_data(
            Layout::Curator,
            base,
            Change::Created,
            "/services/orders"
        ));
        let data = br#"{"address":"192.0.2.1","port":8080}"#;
        let run =
            |m: &mut Mirror, change, data| apply(m, &s, Layout::Curator, base, change, path, data);
        assert_eq!(
            run(&mut m, Change::Created, None),
            Applied::default(),
            "not read: not applied"
        );
        let applied = run(&mut m, Change::Created, Some(Some(&data[..])));
        assert_eq!(applied.touched, [Box::from("orders")]);
        assert_eq!(applied.dir.as_deref(), Some("orders"));
        // Gone again by the time it was read.
        assert_eq!(
            run(&mut m, Change::DataChanged, Some(None)).touched,
            [Box::from("orders")]
        );
        assert!(m.is_empty());
        run(&mut m, Change::Created, Some(Some(&data[..])));
        assert_eq!(
            run(&mut m, Change::Deleted, None).touched,
            [Box::from("orders")]
        );
        run(&mut m, Change::Created, Some(Some(&data[..])));
        let gone = apply(
            &mut m,
            &s,
            Layout::Curator,
            base,
            Change::Deleted,
            "/services/orders",
            None,
        );
        assert_eq!(gone.touched, [Box::from("orders")]);
        assert!(m.is_empty());
    }
}
