//! A real ZooKeeper server for tests: Debian's `zookeeper` package (3.8),
//! run in the foreground as a child process on a free loopback port with
//! its own `zoo.cfg` and data directory, so it can be killed with SIGKILL
//! and started again on the same data. Also a test's own client (the
//! `zookeeper-client` crate) and a separate client process that owns
//! ephemeral znodes.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use zookeeper_client::{Client, CreateMode, Error};

use crate::support::{free_port, wait_for};

const JAR: &str = "/usr/share/java/zookeeper.jar";
/// The server logs through SLF4J; the simple binding writes to stderr,
/// which the harness keeps in `zookeeper.log`.
const LOGGER: &str = "/usr/share/java/slf4j-simple.jar";
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The server's tick. Sessions may last 2 to 20 ticks, so a test can ask
/// for a 2 s session and see it expire quickly.
pub const TICK_MS: u64 = 200;

fn classpath() -> String {
    for p in [JAR, LOGGER] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: install Debian package zookeeper (apt-get install zookeeper)"
        );
    }
    format!("{JAR}:{LOGGER}")
}

/// One standalone ZooKeeper server.
pub struct Zookeeper {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Zookeeper {
    /// A server on a free loopback port with an empty data directory;
    /// returns once it answers `ruok`.
    ///
    /// Panics if the package is not installed, or (with the server's log)
    /// if it does not answer within 60 s.
    pub fn start() -> Zookeeper {
        Self::start_on(free_port())
    }

    /// [`Zookeeper::start`] on a given port.
    pub fn start_on(port: u16) -> Zookeeper {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).expect("mkdir data");
        let cfg = format!(
            "tickTime={TICK_MS}\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
             clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
             4lw.commands.whitelist=ruok\nminSessionTimeout={}\nmaxSessionTimeout={}\n\
             preAllocSize=1024\nforceSync=no\n",
            dir.path().join("data").display(),
            2 * TICK_MS,
            20 * TICK_MS,
        );
        std::fs::write(dir.path().join("zoo.cfg"), cfg).expect("write zoo.cfg");
        let mut zk = Zookeeper {
            dir,
            port,
            child: None,
        };
        zk.spawn();
        zk
    }

    /// `127.0.0.1:PORT`, as the source's `servers` take it.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's log so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("zookeeper.log")
    }

    /// SIGKILL the server and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port and data directory (killing
    /// a running one first) and wait until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new("java")
            .args(["-Xmx256m", "-cp", &classpath()])
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(self.dir.path().join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run java for ZooKeeper ({e}): install Debian package zookeeper")
            });
        self.child = Some(child);
        let port = self.port;
        wait_for("ZooKeeper to answer ruok", READY_DEADLINE, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("ZooKeeper exited with {status}; log:\n{}", self.log());
            }
            (ruok(port) == Some(true)).then_some(())
        });
    }
}

impl Drop for Zookeeper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- last ZooKeeper log lines ---\n{}", tail.join("\n"));
        }
        self.kill();
    }
}

/// Ask the four-letter word `ruok`: `Some(true)` on `imok`.
fn ruok(port: u16) -> Option<bool> {
    use std::io::Read;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"ruok").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer == "imok")
}

/// A test's own client, blocking.
pub struct Zk {
    rt: tokio::runtime::Runtime,
    client: Client,
    acls: zookeeper_client::Acls<'static>,
}

impl Zk {
    /// Connect to `server` (`host:port`).
    pub fn connect(server: &str) -> Zk {
        Self::connect_with(server, None)
    }

    /// Connect to `server` with digest credentials `user:password`; the
    /// znodes it creates are then readable only by that identity.
    pub fn connect_as(server: &str, credentials: &str) -> Zk {
        Self::connect_with(server, Some(credentials))
    }

    fn connect_with(server: &str, credentials: Option<&str>) -> Zk {
        // The client's connection task must run between calls too (it
        // answers the server's pings), so not a current-thread runtime.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut connector = Client::connector().with_session_timeout(Duration::from_secs(4));
        if let Some(c) = credentials {
            connector = connector.with_auth("digest", c.as_bytes());
        }
        let client = rt
            .block_on(connector.connect(server))
            .expect("connect to ZooKeeper");
        let acls = if credentials.is_some() {
            zookeeper_client::Acls::creator_all()
        } else {
            zookeeper_client::Acls::anyone_all()
        };
        Zk { rt, client, acls }
    }

    /// Create `path` (and missing parents, with empty data) holding
    /// `data`; an existing znode gets `data` set. Returns its mzxid.
    pub fn put(&self, path: &str, data: &str) -> i64 {
        self.rt.block_on(async {
            let options = CreateMode::Persistent.with_acls(self.acls);
            let mut at = String::new();
            let parts: Vec<&str> = path[1..].split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                at.push('/');
                at.push_str(part);
                let last = i + 1 == parts.len();
                let bytes = if last { data.as_bytes() } else { b"" };
                match self.client.create(&at, bytes, &options).await {
                    Ok((stat, _)) if last => return stat.mzxid,
                    Ok(_) | Err(Error::NodeExists) if !last => {}
                    Err(Error::NodeExists) => {
                        let stat = self
                            .client
                            .set_data(&at, data.as_bytes(), None)
                            .await
                            .expect("set data");
                        return stat.mzxid;
                    }
                    Err(e) => panic!("create {at}: {e}"),
                    Ok(_) => unreachable!(),
                }
            }
            unreachable!("empty path")
        })
    }

    /// Delete `path` and everything under it, deepest first; `false` if
    /// it did not exist.
    pub fn delete_tree(&self, path: &str) -> bool {
        let mut paths: Vec<String> = self.tree(path).into_keys().collect();
        if paths.is_empty() {
            return false;
        }
        paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        for p in paths {
            match self.rt.block_on(self.client.delete(&p, None)) {
                Ok(()) | Err(Error::NoNode) => {}
                Err(e) => panic!("delete {p}: {e}"),
            }
        }
        true
    }

    /// Data and mzxid of `path`, if it exists.
    pub fn get(&self, path: &str) -> Option<(String, i64)> {
        match self.rt.block_on(self.client.get_data(path)) {
            Ok((data, stat)) => Some((String::from_utf8_lossy(&data).into_owned(), stat.mzxid)),
            Err(Error::NoNode) => None,
            Err(e) => panic!("get {path}: {e}"),
        }
    }

    /// Every znode under `root` (included) with its data.
    pub fn tree(&self, root: &str) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let mut todo = vec![root.to_owned()];
        while let Some(p) = todo.pop() {
            let Some((data, _)) = self.get(&p) else {
                continue;
            };
            out.insert(p.clone(), data);
            if let Ok(children) = self.rt.block_on(self.client.list_children(&p)) {
                todo.extend(children.iter().map(|c| format!("{p}/{c}")));
            }
        }
        out
    }
}

/// A separate client process (ZooKeeper's own CLI, fed on stdin) holding a
/// session of `session_ms` that owns ephemeral znodes.
pub struct EphemeralOwner {
    child: Child,
    stdin: ChildStdin,
}

impl EphemeralOwner {
    /// Start the CLI against `server`.
    pub fn start(server: &str, session_ms: u64) -> EphemeralOwner {
        let mut child = Command::new("java")
            .args(["-Xmx64m", "-cp", &classpath()])
            .arg("org.apache.zookeeper.ZooKeeperMain")
            .args(["-server", server, "-timeout", &session_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run ZooKeeperMain: install Debian package zookeeper");
        let stdin = child.stdin.take().expect("stdin");
        EphemeralOwner { child, stdin }
    }

    /// Ask for an ephemeral znode; the caller waits until it exists (the
    /// CLI reads its input once connected).
    pub fn create(&mut self, path: &str, data: &str) {
        writeln!(self.stdin, "create -e {path} {data}").expect("write to the CLI");
        self.stdin.flush().expect("flush");
    }

    /// SIGKILL the process: its session is not closed, it expires.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EphemeralOwner {
    fn drop(&mut self) {
        self.kill9();
    }
}
