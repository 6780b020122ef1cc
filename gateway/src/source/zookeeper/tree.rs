//! Reading a subtree: the listing, the fetch of one notified znode and the
//! zxid a removal is given. Reads only; what is news is the caller's call.

use std::collections::BTreeMap;

use bytes::Bytes;
use zookeeper_client::{Client, Error};

/// A znode as delivered: its data and the zxid that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Node {
    pub value: Bytes,
    pub mzxid: u64,
}

/// What a fetch after a notification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fetched {
    /// The znode exists, as it is now.
    Present(Node),
    /// The znode is gone; a zxid no lower than its removal (Z2).
    Absent(u64),
}

/// A listed subtree.
pub(super) struct Listing {
    pub nodes: BTreeMap<String, Node>,
    /// The highest zxid the listing saw: every mzxid and every pzxid, so
    /// also the removal of any child that vanished before it was read.
    pub revision: u64,
}

fn zxid(z: i64) -> u64 {
    u64::try_from(z).unwrap_or(0)
}

/// The path of `name` under `parent`.
pub(super) fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The parent of an absolute path other than `/`.
pub(super) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Every znode under `root`, the root included, level by level. The
/// requests of a level are sent together (the client sends them in call
/// order), so a level costs one round trip; `on_level` hears how many
/// znodes each level had. A znode removed between the listing of its
/// parent and its own read is simply left out.
///
/// # Errors
/// A failed request other than "no node".
pub(super) async fn list(
    client: &Client,
    root: &str,
    on_level: &mut (dyn FnMut(usize) + Send),
) -> Result<Listing, Error> {
    let mut nodes = BTreeMap::new();
    let mut revision = 0;
    let mut level = vec![root.to_owned()];
    while !level.is_empty() {
        let reads: Vec<_> = level
            .iter()
            .map(|p| (client.get_data(p), client.list_children(p)))
            .collect();
        let mut next = Vec::new();
        for (path, (data, children)) in level.iter().zip(reads) {
            match data.await {
                Ok((value, stat)) => {
                    revision = revision.max(zxid(stat.mzxid)).max(zxid(stat.pzxid));
                    nodes.insert(
                        path.clone(),
                        Node {
                            value: Bytes::from(value),
                            mzxid: zxid(stat.mzxid),
                        },
                    );
                }
                Err(Error::NoNode) => {}
                Err(e) => return Err(e),
            }
            match children.await {
                Ok(names) => next.extend(names.iter().map(|n| child_path(path, n))),
                Err(Error::NoNode) => {}
                Err(e) => return Err(e),
            }
        }
        on_level(level.len());
        level = next;
    }
    Ok(Listing { nodes, revision })
}

/// The znode at `path` as it is now.
///
/// # Errors
/// A failed request other than "no node".
pub(super) async fn fetch(client: &Client, path: &str) -> Result<Fetched, Error> {
    match client.get_data(path).await {
        Ok((value, stat)) => Ok(Fetched::Present(Node {
            value: Bytes::from(value),
            mzxid: zxid(stat.mzxid),
        })),
        Err(Error::NoNode) => Ok(Fetched::Absent(removal_zxid(client, path).await?)),
        Err(e) => Err(e),
    }
}

/// A zxid no lower than the removal of `path`: the pzxid of its nearest
/// existing ancestor. Removing a znode changes its parent's children, so
/// the parent's pzxid reaches the removal; a parent removed as well was
/// removed later still, which its own parent's pzxid reaches, and `/`
/// always exists. A deleted znode has no stat, and ZooKeeper before 3.9
/// sends no zxid with a notification.
///
/// # Errors
/// A failed request.
pub(super) async fn removal_zxid(client: &Client, path: &str) -> Result<u64, Error> {
    let mut at = parent(path);
    loop {
        if let Some(stat) = client.check_stat(at).await? {
            return Ok(zxid(stat.pzxid));
        }
        if at == "/" {
            // Only a server without `/` could get here.
            return Ok(0);
        }
        at = parent(at);
    }
}
